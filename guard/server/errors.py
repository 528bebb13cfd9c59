"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with ``code`` a string."""

from __future__ import annotations

from guard.events import Verdict
from guard.server.protocol import ErrorBody, ErrorResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        filters: dict[str, Verdict] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.filters = filters
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        return error_body(self.status, self.message, code=self.code, param=self.param, filters=self.filters)


def error_body(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    filters: dict[str, Verdict] | None = None,
) -> ErrorResponse:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = ErrorBody(message=message, type=kind, param=param, code=code or kind)
    if filters is not None:
        body.content_filter_results = filters
    return ErrorResponse(body)
