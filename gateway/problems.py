"""RFC 9457 problem details: the one shape every REST error takes, the guard's refusals included.

Status and kind come from ``opspawn_mcp.errors``. See docs/rest.md, "Errors: RFC 9457 problem
details".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from opspawn_mcp.errors import PROBLEM_MEDIA_TYPE, Door, OpspawnError, RateLimited, problem_document

log = logging.getLogger(__name__)


class Problem(BaseModel):
    """An RFC 9457 problem document; ``kind`` is the ``opspawn_mcp.errors`` kind of the error."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="A URN naming the problem kind: urn:opspawn:problem:<kind>.")
    title: str
    status: int
    detail: str
    kind: str
    problems: list[str] | None = Field(
        default=None,
        description="For an invalid task spec (422): one line per invalid field, '<location>: <message>'.",
    )


def error_document(exc: OpspawnError, door: Door = Door.REST) -> dict[str, Any]:
    """The problem for a typed error: status and kind from errors.py, its details as extensions
    (``problems`` for validation, ``task_id``, ``field``...), exactly what the other doors carry."""
    return exc.problem(door)


def problem_response(
    status: int,
    kind: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> Response:
    return _respond(problem_document(status, kind, detail, **extra), headers)


def error_response(
    exc: OpspawnError, *, headers: Mapping[str, str] | None = None, door: Door = Door.REST
) -> Response:
    """The problem response for a typed error; a ``RateLimited`` one says when to retry
    (``Retry-After``, in seconds), which clients and proxies honour without reading the body."""
    extra = dict(headers or {})
    if isinstance(exc, RateLimited):
        extra["Retry-After"] = str(exc.retry_after_s)
    return _respond(error_document(exc, door), extra)


def _respond(document: dict[str, Any], headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse(
        document, status_code=document["status"], media_type=PROBLEM_MEDIA_TYPE, headers=headers
    )


async def on_opspawn_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OpspawnError)
    return error_response(exc)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return problem_response(exc.status_code, kind, str(exc.detail), headers=exc.headers)


async def on_unexpected(request: Request, exc: Exception) -> Response:
    """A bug: log it with the trace for us, answer a plain 500 problem for the client."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(500, "internal", "The server failed to handle this request; it has been logged.")


EXCEPTION_HANDLERS = {
    OpspawnError: on_opspawn_error,
    HTTPException: on_http_exception,
    Exception: on_unexpected,
}
