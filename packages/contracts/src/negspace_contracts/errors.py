"""One error envelope for every service, and the exceptions on both sides of the wire.

Services raise these exceptions (they are the domain errors); `negspace_servekit` maps them
to HTTP with the envelope below; the typed clients map the envelope back to the same classes.
The envelope is OpenAI's (``{"error": {"message", "type", "param", "code"}}``) so the official
OpenAI client understands the node's errors too.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody


class NegspaceError(Exception):
    """Base of every error a negspace service raises or a client receives."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, status_code: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = dict(headers or {})
        if status_code is not None:
            self.status_code = status_code  # type: ignore[misc]

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.error_type,
                                             param=self.param, code=self.status_code))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status_code}, {self.message!r})"


class BadRequestError(NegspaceError):
    """The request is invalid; the message says what to fix (400, or 422 for schema errors)."""

    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(NegspaceError):
    status_code = 401
    error_type = "authentication_error"


class NotFoundError(NegspaceError):
    status_code = 404
    error_type = "not_found_error"


class ConflictError(NegspaceError):
    status_code = 409
    error_type = "conflict_error"


class PayloadTooLargeError(NegspaceError):
    status_code = 413
    error_type = "payload_too_large"


class RateLimitError(NegspaceError):
    """The service is at capacity; retry after ``retry_after`` seconds."""

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after
        if retry_after is not None:
            self.headers.setdefault("Retry-After", str(max(1, round(retry_after))))


class ServiceUnavailableError(NegspaceError):
    """The service cannot serve now (engine loading or dead, dependency down)."""

    status_code = 503
    error_type = "service_unavailable"


class ServerError(NegspaceError):
    """An unexpected failure inside a service (a bug: services must not produce these)."""

    status_code = 500
    error_type = "internal_error"


class ConnectionFailedError(NegspaceError):
    """The client could not reach the service at all (refused, reset, DNS)."""

    status_code = 599
    error_type = "connection_error"


class TimeoutError_(NegspaceError):
    """The client gave up waiting for the service."""

    status_code = 598
    error_type = "timeout_error"


_BY_STATUS: dict[int, type[NegspaceError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: BadRequestError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_class_for(status_code: int) -> type[NegspaceError]:
    if status_code in _BY_STATUS:
        return _BY_STATUS[status_code]
    if 400 <= status_code < 500:
        return BadRequestError
    if status_code in (502, 504):
        return ServiceUnavailableError
    return ServerError


def is_retryable(exc: BaseException) -> bool:
    """Errors worth retrying elsewhere or later: transport failures, 429, 502/503/504."""
    return isinstance(exc, (ConnectionFailedError, TimeoutError_, RateLimitError,
                            ServiceUnavailableError))
