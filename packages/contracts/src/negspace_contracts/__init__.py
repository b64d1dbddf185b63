"""Wire models, the error envelope and one typed async client per negspace service.

Every service and every caller imports its request/response shapes from here, so no
service hand-writes another's JSON. Depends only on pydantic and httpx.
"""

from negspace_contracts.errors import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    ConnectionFailedError,
    ErrorBody,
    ErrorResponse,
    NegspaceError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    TimeoutError_,
    is_retryable,
)

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "ConnectionFailedError",
    "ErrorBody",
    "ErrorResponse",
    "NegspaceError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitError",
    "ServerError",
    "ServiceUnavailableError",
    "TimeoutError_",
    "is_retryable",
]
