"""s1serve: serving reasoning models with s1-style test-time scaling (budget forcing)."""
