"""The MCP Tasks conformance fixture: opspawn's tasks extension over the in-memory backend.

It serves the tools the ``tasks-*`` scenarios of ``@modelcontextprotocol/conformance`` call, with
the same ``TasksExtension`` that opspawn's own server mounts, so the suite tests the extension
and not a copy of it. Downstream tests use it as a task-returning MCP server.

- ``greet(name)``: synchronous only, "Hello, {name}!".
- ``slow_compute(seconds, label)``: task-supporting (optional); sleeps, then answers.
- ``failing_job``: task required; completes with a tool error (``isError``) after a second.
- ``protocol_error_job``: task required; fails with a JSON-RPC error.
- ``confirm_delete(filename)``: task required; asks one elicitation, then completes.
- ``multi_input``: task required; asks two elicitations at once.
- ``test_tool_with_task``: task required; asks for a name by an MRTR round first (no task yet),
  then makes a task whose result greets that name.

    python -m tests.servers.tasks_conformance --port P     # serves http://127.0.0.1:P/mcp
    python -m tests.servers.tasks_conformance --stdio      # over stdin/stdout (downstream tests)
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INTERNAL_ERROR,
    CallToolRequestParams,
    CallToolResult,
    ElicitRequest,
    ElicitRequestFormParams,
    ElicitResult,
    InputRequiredResult,
    Result,
    TextContent,
)
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from opspawn_mcp.mcp_tasks import DetailedTask, TasksExtension, serve_task_notifications
from opspawn_mcp.mcp_tasks.backend import RequestContext
from opspawn_mcp.mcp_tasks.memory import MemoryTaskBackend, TaskInput
from tests.servers.harness import free_port
from tests.support.fake_openai import spawn_python_server

MCP_PATH = "/mcp"


def _text(text: str, *, error: bool = False) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)], is_error=error)


def _elicit(message: str, **properties: dict[str, Any]) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": list(properties)}
    request = ElicitRequest(params=ElicitRequestFormParams(message=message, requested_schema=schema))
    return request.model_dump(by_alias=True, mode="json", exclude_none=True)


async def _slow_compute(seconds: float, label: str) -> str:
    await asyncio.sleep(seconds)
    return f"computed {label!r} in {seconds:g}s"


async def slow_compute_job(params: CallToolRequestParams, _: TaskInput) -> CallToolResult:
    args = params.arguments or {}
    return _text(await _slow_compute(float(args.get("seconds", 1)), str(args.get("label", ""))))


async def failing_job(_: CallToolRequestParams, __: TaskInput) -> CallToolResult:
    await asyncio.sleep(1)
    return _text("failing_job failed, as it always does", error=True)


async def protocol_error_job(_: CallToolRequestParams, __: TaskInput) -> CallToolResult:
    raise MCPError(code=INTERNAL_ERROR, message="protocol_error_job broke, as it always does")


async def confirm_delete(params: CallToolRequestParams, ask: TaskInput) -> CallToolResult:
    filename = str((params.arguments or {}).get("filename", "?"))
    confirm = {"type": "boolean", "description": "Delete it?"}
    answers = await ask.ask({"confirm": _elicit(f"Delete {filename}?", confirm=confirm)})
    answer = ElicitResult.model_validate(answers["confirm"])
    deleted = answer.action == "accept" and bool((answer.content or {}).get("confirm"))
    return _text(f"{filename} {'deleted' if deleted else 'kept'}")


async def multi_input(_: CallToolRequestParams, ask: TaskInput) -> CallToolResult:
    answers = await ask.ask(
        {
            "name": _elicit("Your name?", name={"type": "string"}),
            "confirm": _elicit("Go ahead?", confirm={"type": "boolean"}),
        }
    )
    return _text(f"got {len(answers)} answers")


async def test_tool_with_task(params: CallToolRequestParams, _: TaskInput) -> CallToolResult:
    answer = ElicitResult.model_validate((params.input_responses or {})["user_name"])
    return _text(f"Hello, {(answer.content or {}).get('name')}!")


class FixtureBackend(MemoryTaskBackend):
    """The memory backend, plus the MRTR round ``test_tool_with_task`` asks before its task."""

    async def create(self, params: CallToolRequestParams, ctx: RequestContext) -> DetailedTask | Result:
        if params.name == "test_tool_with_task" and "user_name" not in (params.input_responses or {}):
            ask = _elicit("Your name?", name={"type": "string"})
            return InputRequiredResult(input_requests={"user_name": ElicitRequest.model_validate(ask)})
        return await super().create(params, ctx)


def build_backend() -> FixtureBackend:
    return FixtureBackend(
        {
            "slow_compute": ("optional", slow_compute_job),
            "failing_job": ("required", failing_job),
            "protocol_error_job": ("required", protocol_error_job),
            "confirm_delete": ("required", confirm_delete),
            "multi_input": ("required", multi_input),
            "test_tool_with_task": ("required", test_tool_with_task),
        }
    )


def build_server(backend: FixtureBackend) -> MCPServer:
    server: MCPServer = MCPServer("opspawn-tasks-conformance", extensions=[TasksExtension(backend)])
    serve_task_notifications(server, backend)

    @server.tool()
    def greet(name: str) -> str:
        """Say hello (synchronous only)."""
        return f"Hello, {name}!"

    @server.tool()
    async def slow_compute(seconds: float = 1, label: str = "") -> str:
        """Sleep `seconds`, then answer; a task for clients that declare the tasks extension."""
        return await _slow_compute(seconds, label)

    def needs_a_task() -> str:
        raise RuntimeError("unreachable: the tasks extension answers -32021 without a task")

    for name, doc in [
        ("failing_job", "Always ends with a tool error (a task)."),
        ("protocol_error_job", "Always fails with a JSON-RPC error (a task)."),
        ("multi_input", "Asks two questions at once (a task)."),
        ("test_tool_with_task", "Asks a name before its task, then greets it."),
    ]:
        server.add_tool(needs_a_task, name=name, description=doc)

    @server.tool()
    def confirm_delete(filename: str) -> str:
        """Ask whether to delete `filename`, then say what happened (a task)."""
        return needs_a_task()

    @server.custom_route("/health", methods=["GET"])
    async def health(_: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return server


async def serve(host: str, port: int) -> None:
    async with build_backend() as backend:
        app = build_server(backend).streamable_http_app(streamable_http_path=MCP_PATH)
        await uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).serve()


async def serve_stdio() -> None:
    async with build_backend() as backend:
        await build_server(backend).run_stdio_async()


@contextmanager
def spawn_tasks_fixture(port: int | None = None) -> Iterator[str]:
    """Run this fixture as a subprocess on 127.0.0.1; yields its MCP URL."""
    port = port or free_port()
    with spawn_python_server("tests.servers.tasks_conformance", port=port, what="tasks conformance fixture"):
        yield f"http://127.0.0.1:{port}{MCP_PATH}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.servers.tasks_conformance")
    parser.add_argument("--host", default="127.0.0.1")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int)
    where.add_argument("--stdio", action="store_true", help="serve over stdin/stdout instead")
    args = parser.parse_args(argv)
    asyncio.run(serve_stdio() if args.stdio else serve(args.host, args.port))


if __name__ == "__main__":
    main()
