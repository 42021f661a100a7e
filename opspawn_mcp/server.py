"""opspawn's own MCP server: the tools and resources over ``TaskService``, on every transport.

Thin adapters; a typed ``OpspawnError`` becomes an ``isError`` result in one place. HTTP assembly
is ``mcp_http``, the answers' shapes ``mcp_views``. See docs/mcp-server.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any, TypeVar, cast

from mcp.server import MCPServer
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.helper_types import ReadResourceContents
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import (
    ResourceError,
    ResourceNotFoundError,
    ToolError,
    UnexpectedResourceError,
    UnexpectedToolError,
)
from mcp.server.subscriptions import InMemorySubscriptionBus
from mcp.shared.exceptions import MCPError
from mcp.types import (
    INVALID_PARAMS,
    CallToolResult,
    GetPromptRequestParams,
    GetPromptResult,
    InputRequiredResult,
    ListPromptsResult,
    ListResourcesResult,
    ListResourceTemplatesResult,
    ListToolsResult,
    LoggingLevel,
    PaginatedRequestParams,
    ReadResourceRequestParams,
    ReadResourceResult,
    SetLevelRequestParams,
    ToolAnnotations,
)
from pydantic import AnyUrl, Field

from agentkit.tools import parse_docstring
from opspawn_mcp.chaining import OPSPAWN_NAME, ChainingExtension, relay_meta
from opspawn_mcp.errors import NotFound, OpspawnError
from opspawn_mcp.exposed import ExposedTools
from opspawn_mcp.exposed_uris import original_uri
from opspawn_mcp.host import OpsMcpClient
from opspawn_mcp.idempotency import key_from_meta
from opspawn_mcp.mcp_http import MCP_SESSION_HEADER
from opspawn_mcp.mcp_logging import SessionLogLevels
from opspawn_mcp.mcp_tasks import TasksExtension, serve_task_notifications
from opspawn_mcp.mcp_views import ServerList, TaskList, TaskView, error_line
from opspawn_mcp.models import (
    APPROVAL_NOTE_MAX_CHARS,
    TaskSpec,
    TaskStatus,
)
from opspawn_mcp.principals import LOCAL, Principal
from opspawn_mcp.server_tasks import ServiceTaskBackend, requester, submit_spec
from opspawn_mcp.service import LIST_PAGE_MAX, SEARCH_MAX_CHARS, WAIT_MAX_S, TaskService

SERVER_NAME = OPSPAWN_NAME
WAIT_CAP_S = 45.0
"""The longest submit_task waits, whatever ``wait`` asks: clients give up on a tool call after
about 60 s (Claude Desktop; claude-code #63379), and a call they abandon is an answer lost.
45 s leaves a margin for the answer to travel; a longer task goes on, and get_status follows it."""

INSTRUCTIONS = f"""\
opspawn runs autonomous agent tasks for you. An agent gets a goal, an LLM and a set of downstream
MCP servers (tools), works through it step by step in the background, and leaves a result.

How to use it:
1. list_servers shows the downstream servers an agent may use and their tools.
2. submit_task starts a task and returns its task_id at once. Name the servers it needs in
   `servers` (omit to allow all). To block until it finishes, pass `wait` (seconds; it waits at
   most {WAIT_CAP_S:g}); if it is still running when the wait ends you get its current status.
   Clients that speak MCP Tasks (io.modelcontextprotocol/tasks) get a task to follow instead.
3. get_status(task_id) shows status (queued, running, completed, failed, cancelled), steps taken,
   the result or error, and token usage. Poll it until `done` is true.
4. cancel_task(task_id) stops a queued or running task. list_tasks finds earlier tasks.
5. A task in status input_required waits for a person to approve one tool call: its `approval`
   says which call and why. Ask the user, then answer with approve_task(task_id, request_id,
   approve, note); the task goes on (a denial is passed to the agent with your note).

Tasks outlive this conversation: keep the task_id. A task that failed carries an `error` saying
why. Resources: opspawn://tasks/{{task_id}} (the task as JSON) and
opspawn://tasks/{{task_id}}/events (its step log).
"""


def _progress_line(kind: str, data: dict[str, Any]) -> str:
    """One short line per event for a progress notification's ``message``."""
    text = json.dumps(data, default=str, separators=(",", ":"))
    return f"{kind} {text[:200]}"


def _log_level(kind: str, data: dict[str, Any]) -> LoggingLevel:
    """How loud a task event is as a log notification: errors and failed tool calls stand out,
    state changes are news, the rest (LLM calls, progress) is detail."""
    if kind == "error":
        return "error"
    if kind == "tool_result" and data.get("is_error"):
        return "warning"
    return "info" if kind == "state" else "debug"


def _arg(description: str, **schema: Any) -> Any:
    """A tool argument's JSON schema, documented but not enforced by the SDK.

    The arguments are typed ``Any`` so every check (types, limits, enums) happens once, in
    ``TaskService`` and the models: an MCP caller then gets the same ``invalid_input: ...``
    message a REST or gRPC caller gets, instead of the SDK's own validation text.
    """
    return Field(description=description, json_schema_extra=schema)


_SPEC_SCHEMA = TaskSpec.model_json_schema()


def _spec_arg(name: str, description: str) -> Any:
    """A submit_task argument documented with ``TaskSpec``'s own schema for the field (type,
    limits, enum), so each limit is written once, on the model; ``description`` is worded for
    an LLM caller. An optional field shows its non-null form, a nested model its properties."""
    field = dict(_SPEC_SCHEMA["properties"][name])
    if "$ref" in field:
        field = dict(_SPEC_SCHEMA["$defs"][field.pop("$ref").rsplit("/", 1)[-1]])
    for branch in field.pop("anyOf", []):
        if branch.get("type") != "null":
            field |= branch
    schema = {k: v for k, v in field.items() if k not in ("title", "default", "description")}
    return _arg(description, **schema)


TaskId = Annotated[Any, _arg("The task_id returned by submit_task or list_tasks.", type="string")]


def caller(ctx: Context, local: Principal) -> Principal:
    """Who sent this tool call or resource read (``server_tasks.requester``)."""
    return requester(ctx.request_context, local)


_Listed = TypeVar(
    "_Listed", ListToolsResult, ListResourcesResult, ListResourceTemplatesResult, ListPromptsResult
)
_More = Callable[[ExposedTools, Principal], Sequence[Any]]
_Tool = TypeVar("_Tool", bound=Callable[..., Any])

READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)


class _Server(MCPServer):
    """The SDK's server, with ``submit_task``'s arguments checked like a REST body: a missing
    goal gets the service's message (not the SDK's "validation error for submit_taskArguments"),
    and an unknown argument is refused (the SDK would drop it silently) with the names it takes.
    With ``exposed``, it also lists and routes the downstream tools, resources and prompts of
    ``mcpServers.X.expose``; opspawn's own come first and are served as before."""

    exposed: ExposedTools | None = None
    local: Principal = LOCAL
    chain: tuple[str, int] = ("opspawn", 0)
    """This instance's id and ``max_depth``, for the chain of exposed calls."""

    def _listing(self, ctx: ServerRequestContext[Any]) -> Principal:
        """Who lists; their connection is remembered for ``*/list_changed`` (``ExposedTools``)."""
        request = ctx.request
        session_id = None
        if request is not None:
            session_id = request.headers.get(MCP_SESSION_HEADER) or request.query_params.get("session_id")
        if self.exposed is not None:
            self.exposed.remember(ctx.session, session_id)
        return requester(ctx, self.local)

    def _extended(self, ctx: ServerRequestContext[Any], listed: _Listed, field: str, more: _More) -> _Listed:
        """``listed`` (opspawn's own) followed by the exposed servers' items of ``field``."""
        if self.exposed is None:
            return listed
        # Narrowed above; mypy loses it while checking each of the TypeVar's constraints.
        items = [*getattr(listed, field), *more(cast(ExposedTools, self.exposed), self._listing(ctx))]
        return listed.model_copy(update={field: items})

    async def _handle_list_tools(
        self, ctx: ServerRequestContext[Any], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        listed = await super()._handle_list_tools(ctx, params)
        return self._extended(ctx, listed, "tools", ExposedTools.list_tools)

    async def _handle_list_resources(
        self, ctx: ServerRequestContext[Any], params: PaginatedRequestParams | None
    ) -> ListResourcesResult:
        listed = await super()._handle_list_resources(ctx, params)
        return self._extended(ctx, listed, "resources", ExposedTools.list_resources)

    async def _handle_list_resource_templates(
        self, ctx: ServerRequestContext[Any], params: PaginatedRequestParams | None
    ) -> ListResourceTemplatesResult:
        listed = await super()._handle_list_resource_templates(ctx, params)
        return self._extended(ctx, listed, "resource_templates", ExposedTools.list_resource_templates)

    async def _handle_read_resource(
        self, ctx: ServerRequestContext[Any], params: ReadResourceRequestParams
    ) -> ReadResourceResult | InputRequiredResult:
        if self.exposed is not None and original_uri(params.uri) is not None:
            by = requester(ctx, self.local)
            target = self.exposed.route_uri(params.uri, by)
            if target is None:
                raise MCPError(INVALID_PARAMS, f"Unknown resource: {params.uri}", {"uri": params.uri})
            return await self.exposed.read_resource(*target, by)
        return await super()._handle_read_resource(ctx, params)

    async def _handle_list_prompts(
        self, ctx: ServerRequestContext[Any], params: PaginatedRequestParams | None
    ) -> ListPromptsResult:
        listed = await super()._handle_list_prompts(ctx, params)
        return self._extended(ctx, listed, "prompts", ExposedTools.list_prompts)

    async def _handle_get_prompt(
        self, ctx: ServerRequestContext[Any], params: GetPromptRequestParams
    ) -> GetPromptResult | InputRequiredResult:
        if self.exposed is not None:
            by = requester(ctx, self.local)
            target = self.exposed.route_prompt(params.name, by)
            if target is not None:
                return await self.exposed.get_prompt(*target, params.arguments, by)
        return await super()._handle_get_prompt(ctx, params)

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context | None = None
    ) -> CallToolResult | InputRequiredResult:
        """The one place a typed error becomes a tool error. A tool body raises ``OpspawnError``
        as it is: the SDK wraps it as an unexpected crash with a blank message, so it is
        unwrapped here and worded by ``mcp_views.error_line`` under the SDK's usual prefix; an
        argument refused before the tool runs carries no prefix."""
        request = context.request_context if context is not None else None
        try:
            return await self._call_tool(name, arguments, context)
        except OpspawnError as exc:
            raise ToolError(error_line(exc, request)) from exc
        except UnexpectedToolError as exc:
            if not isinstance(exc.__cause__, OpspawnError):
                raise
            line = error_line(exc.__cause__, request)
            raise ToolError(f"Error executing tool {name}: {line}") from exc.__cause__

    async def read_resource(
        self, uri: AnyUrl | str, context: Context | None = None
    ) -> Iterable[ReadResourceContents] | InputRequiredResult:
        """The one place a typed error becomes a resource error, as ``call_tool`` does for tools:
        a task the caller cannot see is not found (-32602), any other typed error its one line."""
        try:
            return await super().read_resource(uri, context)
        except UnexpectedResourceError as exc:
            cause = exc.__cause__
            if isinstance(cause, NotFound):
                raise ResourceNotFoundError(cause.message) from cause
            if isinstance(cause, OpspawnError):
                raise ResourceError(
                    error_line(cause, context.request_context if context else None)
                ) from cause
            raise

    async def _call_tool(
        self, name: str, arguments: dict[str, Any], context: Context | None
    ) -> CallToolResult | InputRequiredResult:
        if self.exposed is not None and context is not None:
            by = caller(context, self.local)
            target = self.exposed.route(name, by)
            if target is not None:
                meta = context.request_context.meta or {}
                progress = context.report_progress if meta.get("progress_token") is not None else None
                # The caller's delegation chain goes on, with this instance (an opspawn
                # calling through here must not hide a loop): opspawn_mcp.chaining.
                relayed = relay_meta(meta, *self.chain)
                return await self.exposed.call(*target, arguments, by, progress=progress, meta=relayed)
        if name == "submit_task":
            submit_spec(arguments)
        return await super().call_tool(name, arguments, context)

    def described_tool(self, title: str, annotations: ToolAnnotations) -> Callable[[_Tool], _Tool]:
        """``MCPServer.tool`` with the function's docstring as its description, on one line (the
        SDK passes ``__doc__`` as written, indentation and all, to the LLM that reads it)."""

        def register(fn: _Tool) -> _Tool:
            summary, _ = parse_docstring(fn.__doc__)
            self.add_tool(fn, title=title, description=summary, annotations=annotations)
            return fn

        return register

    def serve_log_levels(self, levels: SessionLogLevels) -> None:
        """``logging/setLevel`` for 2025-11-25 clients. MCPServer has no public hook for a spec
        method the 2026-07-28 revision removed; the SDK's ``MethodBinding`` docs point to the
        low-level server's ``add_request_handler`` for exactly this."""
        self._lowlevel_server.add_request_handler("logging/setLevel", SetLevelRequestParams, levels.set_level)


def build_server(
    service: TaskService, local: Principal = LOCAL, *, pool: OpsMcpClient | None = None
) -> MCPServer:
    """The MCP server for ``service``: the same object serves stdio, SSE and streamable HTTP.

    ``local`` is who stdio (and in-process) callers are: the config's local principal. With
    ``pool``, the tools of servers configured with ``expose`` are listed and called through it
    (``opspawn_mcp.exposed``).
    """
    backend = ServiceTaskBackend(service, local, TaskView.of)
    bus = InMemorySubscriptionBus()
    server = _Server(
        SERVER_NAME,
        instructions=INSTRUCTIONS,
        log_level="WARNING",
        extensions=[TasksExtension(backend), ChainingExtension(service.instance_id, service.max_depth)],
        subscriptions=bus,
    )
    server.local = local
    server.chain = (service.instance_id, service.max_depth)
    if pool is not None:
        server.exposed = ExposedTools(pool, bus, service.record_call)
    serve_task_notifications(server, backend)
    levels = SessionLogLevels()
    server.serve_log_levels(levels)

    @server.described_tool(
        "Submit an agent task",
        ToolAnnotations(destructive_hint=False, idempotent_hint=False, open_world_hint=True),
    )
    async def submit_task(
        goal: Annotated[
            Any,
            _spec_arg("goal", "What the agent must do, in plain language, with everything it needs to know."),
        ],
        ctx: Context,
        servers: Annotated[
            Any, _spec_arg("servers", "Names from list_servers the agent may use; omit to allow all of them.")
        ] = None,
        model: Annotated[
            Any,
            _spec_arg(
                "model",
                "A model profile of this server by name, and its temperature/max_tokens; omit for the "
                "default profile.",
            ),
        ] = None,
        budget: Annotated[
            Any, _spec_arg("budget", "Per-task budgets: max_llm_tokens, max_tool_calls.")
        ] = None,
        max_steps: Annotated[Any, _spec_arg("max_steps", "Step budget (LLM calls); default 10.")] = None,
        planner: Annotated[
            Any, _spec_arg("planner", "'react' (default) acts step by step; 'plan_and_execute' plans first.")
        ] = None,
        timeout_s: Annotated[
            Any, _spec_arg("timeout_s", "Seconds the task may run before it fails; default 300.")
        ] = None,
        system_prompt: Annotated[
            Any, _spec_arg("system_prompt", "Extra instructions for the agent's LLM.")
        ] = None,
        wait: Annotated[
            Any,
            _arg(
                f"Seconds to wait for the result before returning (0 returns at once; waits at most "
                f"{WAIT_CAP_S:g}, below clients' tool-call timeouts, the task runs on). "
                "With a progress token you get a progress notification for each step.",
                type="number",
                minimum=0,
                maximum=WAIT_MAX_S,
            ),
        ] = 0,
    ) -> TaskView:
        """Start an autonomous agent task: an LLM works toward `goal` using the tools of the allowed
        downstream servers (see list_servers). Returns the task's status with its task_id; poll
        get_status until `done`, or pass `wait` to block for the result."""
        by = caller(ctx, local)
        arguments = {
            "goal": goal,
            "servers": servers,
            "model": model,
            "budget": budget,
            "max_steps": max_steps,
            "planner": planner,
            "timeout_s": timeout_s,
            "system_prompt": system_prompt,
        }
        service.check_wait(wait)
        meta = ctx.request_context.meta
        task = await service.submit(submit_spec(arguments, meta), by=by, idempotency_key=key_from_meta(meta))
        if wait > 0:
            count = 0

            async def progress(event: Any) -> None:
                nonlocal count
                count += 1
                await ctx.report_progress(count, None, _progress_line(event.kind, event.data))
                data = {"task_id": task.id, "seq": event.seq, "kind": event.kind, "data": event.data}
                await levels.log(ctx, _log_level(event.kind, event.data), data)

            # The task runs on whatever happens to this call: a client that gives up or
            # disconnects cancels only this wait.
            task = await service.wait(task.id, min(wait, WAIT_CAP_S), progress, by=by)
        return TaskView.of(task)

    @server.described_tool("Get a task's status", READ_ONLY)
    async def get_status(ctx: Context, task_id: TaskId = None) -> TaskView:
        """Show one task: status (queued, running, completed, failed, cancelled), steps taken, the
        result when completed or the error when failed, token usage and times."""
        return TaskView.of(await service.get(task_id, by=caller(ctx, local)))

    @server.described_tool("List tasks", READ_ONLY)
    async def list_tasks(
        ctx: Context,
        status: Annotated[
            Any, _arg("Only tasks in this status.", type="string", enum=[s.value for s in TaskStatus])
        ] = None,
        limit: Annotated[Any, _arg("Page size.", type="integer", minimum=1, maximum=LIST_PAGE_MAX)] = 20,
        cursor: Annotated[
            Any, _arg("next_cursor from the previous page; omit for the newest.", type="string")
        ] = None,
        goal_contains: Annotated[
            Any,
            _arg(
                "Only tasks whose goal contains this text (any case).",
                type="string",
                maxLength=SEARCH_MAX_CHARS,
            ),
        ] = None,
    ) -> TaskList:
        """List tasks newest first, optionally only those in one status or whose goal contains
        `goal_contains`. Page with `cursor`."""
        by = caller(ctx, local)
        page = await service.list_tasks(status, limit, cursor, goal_contains=goal_contains, by=by)
        return TaskList(tasks=[TaskView.of(t) for t in page.items], next_cursor=page.next_cursor)

    @server.described_tool(
        "Cancel a task", ToolAnnotations(destructive_hint=True, idempotent_hint=True, open_world_hint=False)
    )
    async def cancel_task(ctx: Context, task_id: TaskId = None) -> TaskView:
        """Cancel a queued, running or input_required task. Cancelling a cancelled task is harmless; a
        completed or failed task cannot be cancelled."""
        return TaskView.of(await service.cancel(task_id, by=caller(ctx, local)))

    @server.described_tool(
        "Approve or deny a waiting tool call",
        ToolAnnotations(destructive_hint=True, idempotent_hint=False, open_world_hint=False),
    )
    async def approve_task(
        ctx: Context,
        task_id: TaskId = None,
        request_id: Annotated[
            Any, _arg("The `approval.id` get_status shows for the waiting task.", type="string")
        ] = None,
        approve: Annotated[Any, _arg("true runs the tool call; false denies it.", type="boolean")] = None,
        note: Annotated[
            Any,
            _arg("Why; the agent reads it with a denial.", type="string", maxLength=APPROVAL_NOTE_MAX_CHARS),
        ] = None,
    ) -> TaskView:
        """Answer the approval request of a task in status input_required (get_status shows it in
        `approval`): approve=true runs the tool call, false denies it and the agent reads your
        note. Ask the user first; the task goes on either way."""
        answer = {k: v for k, v in {"approve": approve, "note": note}.items() if v is not None}
        return TaskView.of(await service.answer(task_id, request_id, answer, by=caller(ctx, local)))

    @server.described_tool("List downstream servers", READ_ONLY)
    async def list_servers(ctx: Context) -> ServerList:
        """The MCP servers opspawn's agents may use (name them in submit_task's `servers`), with
        connection state and tool names."""
        return ServerList(servers=service.list_servers(by=caller(ctx, local)))

    @server.resource(
        "opspawn://tasks/{task_id}",
        name="task",
        description="A task as JSON: spec, status, result or error, usage, times.",
        mime_type="application/json",
    )
    async def task_resource(task_id: str, ctx: Context) -> str:
        return (await service.get(task_id, by=caller(ctx, local))).model_dump_json()

    @server.resource(
        "opspawn://tasks/{task_id}/events",
        name="task-events",
        description="A task's event log as a JSON array, oldest first (up to 1000 events).",
        mime_type="application/json",
    )
    async def events_resource(task_id: str, ctx: Context) -> str:
        events = await service.events(task_id, 0, 1000, by=caller(ctx, local))
        return json.dumps([e.model_dump(mode="json") for e in events])

    return server
