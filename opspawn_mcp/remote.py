"""The CLI's client of a running ``opspawn-mcp serve``: one tool call, or one task's event stream.

Tool calls go over MCP (streamable HTTP), so the CLI sees what an assistant sees; ``--follow``
reads the REST event stream. See docs/mcp-server.md, "From a shell with opspawn-mcp itself".
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import Implementation

from opspawn_mcp.errors import CLI_CLIENT_NAME
from opspawn_mcp.models import TaskEvent

CONNECT_TIMEOUT_S = 30.0
RESPONSE_MARGIN_S = 60.0
"""How long a server may take to answer beyond the work asked of it (a ``--wait``)."""


class Unreachable(Exception):
    """The server could not be reached or refused us; the message is the one line to show."""


class Refused(Exception):
    """The server answered with a typed error (``kind``); the message says what to do."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Remote:
    """A running server at ``url`` (its MCP endpoint), called with ``token`` when there is one."""

    url: str
    token: str | None

    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def call(
        self, tool: str, arguments: dict[str, object], *, timeout_s: float = RESPONSE_MARGIN_S
    ) -> dict[str, Any]:
        """One ``tools/call``, answered within ``timeout_s``: its structured result."""
        refused: list[int] = []

        async def note_refusal(response: httpx2.Response) -> None:
            # The MCP client turns an HTTP 401 into a generic JSON-RPC error; keep the status.
            if response.status_code in (401, 403):
                refused.append(response.status_code)

        info = Implementation(name=CLI_CLIENT_NAME, version=version("opspawn"))
        try:
            async with (
                httpx2.AsyncClient(
                    headers=self._headers,
                    timeout=httpx2.Timeout(CONNECT_TIMEOUT_S, read=timeout_s),
                    event_hooks={"response": [note_refusal]},
                ) as http,
                Client(streamable_http_client(self.url, http_client=http), client_info=info) as client,
            ):
                result = await client.call_tool(tool, arguments, read_timeout_seconds=timeout_s)
        except Exception as exc:
            if refused:
                raise Unreachable(self._refusal(refused[0])) from None
            raise Unreachable(reason(self.url, exc, timeout_s)) from None
        if result.is_error:
            text = "".join(getattr(block, "text", "") for block in result.content)
            kind, _, message = text.removeprefix(f"Error executing tool {tool}: ").partition(": ")
            raise Refused(kind, message or kind)
        return result.structured_content or {}

    async def events(self, task_id: str) -> AsyncIterator[TaskEvent]:
        """The task's events, oldest first, each as soon as it is written; ends with the task."""
        url = httpx2.URL(self.url).join(f"/v1/tasks/{task_id}/events")
        try:
            async with (
                httpx2.AsyncClient(
                    headers=self._headers, timeout=httpx2.Timeout(CONNECT_TIMEOUT_S, read=None)
                ) as http,
                http.stream("GET", url) as response,
            ):
                if response.status_code != 200:
                    await response.aread()
                    raise self._problem(response)
                async for sse in httpx2.EventSource(response):
                    if sse.event == "problem":
                        problem = json.loads(sse.data)
                        raise Refused(problem.get("kind", "error"), problem.get("detail", sse.data))
                    yield TaskEvent.model_validate_json(sse.data)
        except (Refused, Unreachable):
            raise
        except Exception as exc:
            raise Unreachable(reason(str(url), exc)) from None

    def _problem(self, response: httpx2.Response) -> Exception:
        if response.status_code in (401, 403):
            return Unreachable(self._refusal(response.status_code))
        try:
            problem = response.json()
            return Refused(problem["kind"], problem["detail"])
        except (ValueError, KeyError, TypeError):
            return Unreachable(f"the opspawn server at {self.url} answered HTTP {response.status_code}")

    def _refusal(self, status: int) -> str:
        hint = (
            "check the token"
            if self.token
            else "set OPSPAWN_TOKEN to your token (a token of opspawn.server.tokens)"
        )
        return f"the opspawn server at {self.url} refused the request (HTTP {status}): {hint}"


def _leaves(exc: BaseException) -> list[BaseException]:
    """The real errors inside ``exc``: exception groups (task groups) unwrapped, in order."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def reason(url: str, exc: BaseException, timeout_s: float = RESPONSE_MARGIN_S) -> str:
    """One line naming the real cause, whatever the MCP client wrapped it in.

    Checked from the most to the least specific: a server that went away mid-request (it
    crashed or stopped; later cleanup requests then fail to connect too), no server at all, a
    timeout, and otherwise the first underlying error by type and message.
    """
    leaves = _leaves(exc)
    related: list[BaseException] = []
    for leaf in leaves:
        err: BaseException | None = leaf
        while err is not None and err not in related:
            related.append(err)
            err = err.__cause__ or err.__context__
    if any(isinstance(e, httpx2.RemoteProtocolError | httpx2.ReadError) for e in related):
        return (
            f"the opspawn server at {url} closed the connection before answering: it stopped or "
            "crashed; check its log"
        )
    if any(isinstance(e, httpx2.ConnectError | httpx2.ConnectTimeout | ConnectionError) for e in related):
        return f"no opspawn server at {url}: start one with `opspawn-mcp serve`"
    if any(isinstance(e, httpx2.TimeoutException | TimeoutError) for e in related):
        return f"the opspawn server at {url} did not answer within {timeout_s:g} s"
    first = leaves[0]
    detail = str(first).strip()
    return f"could not talk to the opspawn server at {url}: {type(first).__name__}" + (
        f": {detail}" if detail else ""
    )
