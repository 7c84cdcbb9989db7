"""User-facing error types, one per kind of failure.

The network layer maps each kind once (INVALID_ARGUMENT / 400, RESOURCE_EXHAUSTED / 429, ...);
the engine raises them before anything is scheduled, so a bad request never disturbs the batch.
"""


class S1ServeError(Exception):
    """Base of every error s1serve raises on purpose."""


class InvalidRequestError(S1ServeError, ValueError):
    """A request field has a value the engine cannot serve. `field` names it for the client."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class EmptyPromptError(InvalidRequestError):
    def __init__(self, field: str = "prompt"):
        super().__init__(field, "must contain at least one token")


class PromptTooLongError(InvalidRequestError):
    def __init__(self, num_tokens: int, limit: int, what: str, field: str = "prompt"):
        super().__init__(field, f"has {num_tokens} tokens; {what} allows at most {limit}")
        self.num_tokens = num_tokens
        self.limit = limit


class InvalidSamplingParamError(InvalidRequestError):
    """A sampling field (temperature, top_p, max_tokens, ...) is out of range."""


class InvalidConfigError(S1ServeError, ValueError):
    """An engine configuration value is unusable (raised at start-up, not per request)."""


class UnsupportedModelError(S1ServeError):
    """The model directory describes an architecture or feature this engine does not implement."""


class RequestNotFoundError(S1ServeError, KeyError):
    """An abort or lookup named a request id the engine does not know."""


class DuplicateRequestError(InvalidRequestError):
    def __init__(self, request_id: str):
        super().__init__("request_id", f"{request_id!r} is already in flight")


class OverloadedError(S1ServeError):
    """The waiting queue is full: retry later (RESOURCE_EXHAUSTED / 429)."""

    def __init__(self, waiting: int, limit: int, retry_after_s: float = 1.0):
        super().__init__(f"server overloaded: {waiting} requests waiting (limit {limit}); retry in {retry_after_s:g} s")
        self.retry_after_s = retry_after_s


class UnavailableError(S1ServeError):
    """The server cannot take work now (UNAVAILABLE / 503): it is draining, or its engine died."""


class DataError(InvalidConfigError):
    """A data file (a dataset source, a training set) is missing, unreadable or malformed; the
    message names the file, and the line where there is one."""
