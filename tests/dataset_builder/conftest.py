from tests.api.conftest import server, stub  # noqa: F401  (a real server per test module)
