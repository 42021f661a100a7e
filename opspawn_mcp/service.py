"""TaskService: the one API behind every front door (MCP tools, REST routes, gRPC methods).

Every rule about what a client may ask lives here once; the doors only translate. See
docs/architecture.md, "One service, three doors".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from pydantic import ValidationError

from agentkit.errors import validation_problems
from opspawn_mcp.approvals import settle
from opspawn_mcp.chaining import check_chain, instance_id
from opspawn_mcp.config import Config
from opspawn_mcp.errors import (
    Conflict,
    Forbidden,
    Hint,
    IllegalTransition,
    InvalidInput,
    NotFound,
    OpspawnError,
    PayloadTooLarge,
    TaskNotFound,
    Unavailable,
)
from opspawn_mcp.host.models import ServerInfo
from opspawn_mcp.idempotency import check_key, repeated
from opspawn_mcp.limits import SubmitGate
from opspawn_mcp.models import (
    GOAL_MAX_CHARS,
    ApprovalAnswer,
    Budget,
    ExposedCall,
    ExposedCallPage,
    ModelSettings,
    Task,
    TaskEvent,
    TaskPage,
    TaskSpec,
    TaskStatus,
)
from opspawn_mcp.principals import Principal
from opspawn_mcp.scheduler import Enqueuer, Scheduler
from opspawn_mcp.store.base import KeyTaken, TaskStore

TASK_ID_MAX_CHARS = 64
EVENTS_PAGE_MAX = 1000
LIST_PAGE_MAX = 200
WAIT_MAX_S = 600.0
# A watcher re-reads at least this often even if no write woke it (a wakeup lost in transit).
WATCH_SAFETY_S = 30.0
CANCELLED_BY_CLIENT = "cancelled by the client"


class ServerDirectory(Protocol):
    """What the service needs from the host pool (``OpsMcpClient``): a snapshot, no I/O."""

    def servers_info(self) -> Sequence[ServerInfo]: ...


EventCallback = Callable[[TaskEvent], Awaitable[None]]


class TaskService:
    """Validates requests, schedules tasks, and reads them back; owns none of its parts.

    ``config`` says which downstream servers and model profiles exist; ``store`` is the truth;
    ``enqueuer`` hands ids to the workers; ``servers`` describes the downstream pool.
    Watchers are woken by the writers (``TaskStore.wait_for_change``: in process, or through
    PostgreSQL NOTIFY from a worker process); ``poll_interval_s`` is only the safety net, how
    long a watcher trusts that no wakeup was lost before it re-reads the store anyway.

    Every call names its caller (``by``): a principal sees and cancels only its own tasks
    (an admin sees all), may use only its allowed servers and profiles, and is held to its
    limits. Someone else's task is "not found", so ids cannot be probed.
    """

    def __init__(
        self,
        config: Config,
        store: TaskStore,
        enqueuer: Enqueuer,
        servers: ServerDirectory,
        *,
        poll_interval_s: float = WATCH_SAFETY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._store = store
        self._enqueuer = enqueuer
        self._scheduler = Scheduler(store, enqueuer)
        self._servers = servers
        self._poll_s = poll_interval_s
        self._gate = SubmitGate(store, clock)
        self.instance_id = instance_id(config)
        """This instance's name in delegation chains (``opspawn_mcp.chaining``)."""

    @property
    def max_depth(self) -> int:
        """How many instances a delegated goal may have come through (``opspawn.chaining``)."""
        return self._config.opspawn.chaining.max_depth

    @property
    def server_names(self) -> list[str]:
        """Every configured downstream server (what an admin may name in ``servers``)."""
        return list(self._config.mcp_servers)

    @property
    def profile_names(self) -> list[str]:
        """Every configured model profile (what an admin may name in ``model.profile``)."""
        return list(self._config.opspawn.profiles)

    # -- validation -----------------------------------------------------------------------

    def validate(self, spec: TaskSpec | Mapping[str, Any], *, by: Principal) -> TaskSpec:
        """Turn a client's request into a spec that can run, or raise a typed error saying why not.

        Returns a copy with the model profile, the servers and the budget resolved for ``by``,
        so the worker runs exactly what was accepted even if the config changes later.
        """
        if isinstance(spec, TaskSpec):
            _check_goal(spec.goal)
            checked = spec  # already a valid spec: not validated again
        elif isinstance(spec, Mapping):
            checked = self._parse(spec, by)
        else:
            raise InvalidInput(f"A task spec must be a JSON object, not {type(spec).__name__}.")
        check_chain(checked.chain, self.instance_id, self._config.opspawn.chaining.max_depth)
        return checked.model_copy(
            update={
                "servers": self._check_servers(checked.servers, by),
                "model": self._check_model(checked.model, by),
                "timeout_s": self._check_timeout(checked, by),
                "budget": self._check_budget(checked.budget, by),
            }
        )

    def _parse(self, fields: Mapping[str, Any], by: Principal) -> TaskSpec:
        """A JSON client's fields as a ``TaskSpec``, validated once; a missing or blank goal and
        a model endpoint are refused first, each with its own message."""
        _check_goal(fields.get("goal"))
        self._refuse_endpoint_fields(fields.get("model"), by)
        try:
            return TaskSpec.model_validate(fields)
        except ValidationError as exc:
            raise invalid("task spec", exc, root="(spec)") from None

    def _profiles(self, by: Principal) -> list[str]:
        return [n for n in self._config.opspawn.profiles if by.may_use_profile(n)]

    def _refuse_endpoint_fields(self, model: Any, by: Principal) -> None:
        """Say plainly why ``base_url``, ``api_key_env``... are refused: models are chosen by name."""
        if not isinstance(model, Mapping):
            return
        named = sorted(k for k in model if k in _ENDPOINT_FIELDS)
        if named:
            raise InvalidInput(
                f"model.{named[0]} cannot be set by a client: endpoints, model names and keys are "
                f"chosen in the server's config. Pick a model profile by name with model.profile "
                f"(yours: {', '.join(self._profiles(by))}) and tune only temperature and max_tokens.",
                field=f"model.{named[0]}",
            )

    def _check_model(self, given: ModelSettings, by: Principal) -> ModelSettings:
        profile = given.profile or by.default_profile
        allowed = self._profiles(by)
        if profile not in allowed:
            raise Forbidden(
                f"Unknown model profile {profile!r}; you may use: {', '.join(allowed) or 'none'}.",
                field="model.profile",
            )
        return given.model_copy(update={"profile": profile})

    def _check_servers(self, wanted: list[str] | None, by: Principal) -> list[str] | None:
        """Only servers the config defines (and the caller may use): nobody can add their own."""
        configured = [n for n in self._config.mcp_servers if by.may_use_server(n)]
        if wanted is None:
            return None if by.servers is None else configured
        unknown = [name for name in wanted if name not in configured]
        if unknown:
            known = ", ".join(configured) or "none are available to you"
            raise Forbidden(
                f"Unknown server(s) {', '.join(map(repr, unknown))}; you may use: {known}.",
                hint=Hint("List them with {}.", "list_servers"),
                servers=unknown,
            )
        return list(dict.fromkeys(wanted))

    def _check_timeout(self, spec: TaskSpec, by: Principal) -> float:
        limit = by.limits.max_task_seconds
        if limit is None or spec.timeout_s <= limit:
            return spec.timeout_s
        if "timeout_s" not in spec.model_fields_set:
            return limit  # the default is longer than this caller may run: its limit applies
        raise InvalidInput(
            f"timeout_s={spec.timeout_s:g} is over your limit of {limit:g} s; ask for at most that.",
            field="timeout_s",
        )

    def _check_budget(self, budget: Budget, by: Principal) -> Budget:
        limits = by.limits
        caps = {"max_llm_tokens": limits.max_task_tokens, "max_tool_calls": limits.max_tool_calls}
        resolved: dict[str, int | None] = {}
        for name, cap in caps.items():
            asked: int | None = getattr(budget, name)
            if cap is not None and asked is not None and asked > cap:
                raise InvalidInput(
                    f"budget.{name}={asked} is over your limit of {cap}; ask for at most that.",
                    field=f"budget.{name}",
                )
            resolved[name] = asked if asked is not None else cap
        return Budget(**resolved)

    # -- commands ---------------------------------------------------------------------------

    async def submit(
        self, spec: TaskSpec | Mapping[str, Any], *, by: Principal, idempotency_key: str | None = None
    ) -> Task:
        """Validate, check the caller's limits, persist as ``queued``, enqueue.

        The returned task is durable and will run. With ``idempotency_key``, a caller that
        already submitted this request under that key gets that task back (whatever its
        status, and even at its limits: nothing new is started); the same key with another
        request is a ``Conflict`` (``opspawn_mcp.idempotency``).
        """
        checked = self.validate(spec, by=by)
        key = check_key(idempotency_key, field="idempotency_key")
        if key is not None:
            existing = await self._store.get_by_key(by.name, key)
            if existing is not None:
                return repeated(existing, checked)
        try:
            async with self._gate.admit(by):
                return await self._scheduler.schedule(checked, principal=by.name, idempotency_key=key)
        except KeyTaken as taken:  # a concurrent submit with the key won the insert
            return repeated(taken.task, checked)

    async def get(self, task_id: str, *, by: Principal) -> Task:
        task = await self._store.get(_check_id(task_id))
        if not by.may_see(task.principal):
            raise TaskNotFound(task.id)
        return task

    async def list_tasks(
        self,
        status: TaskStatus | str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        *,
        goal_contains: str | None = None,
        by: Principal,
    ) -> TaskPage:
        """Newest first, the caller's own tasks (an admin's: all). ``cursor`` is the previous
        page's ``next_cursor``; ``goal_contains`` keeps the tasks whose goal contains that text
        (case-insensitive)."""
        wanted = _status(status)
        text = _search_text(goal_contains)
        _check_page(limit, cursor)
        owner = None if by.admin else by.name
        return await self._store.list_tasks(
            wanted, limit, cursor or None, principal=owner, goal_contains=text
        )

    async def list_calls(
        self, server: str | None = None, limit: int = 50, cursor: str | None = None, *, by: Principal
    ) -> ExposedCallPage:
        """Calls made through the exposed view, newest first: the caller's own (an admin's:
        everyone's), of one ``server`` when given (one the caller may use, else ``NotFound``)."""
        _check_page(limit, cursor)
        if server is not None and (
            not isinstance(server, str) or server not in self.server_names or not by.may_use_server(server)
        ):
            raise NotFound(f"No MCP server named {server!r} is configured for you.", server=str(server))
        owner = None if by.admin else by.name
        return await self._store.list_calls(limit, cursor or None, principal=owner, server=server)

    async def record_call(self, call: ExposedCall) -> None:
        """Keep an exposed call for the audit (``opspawn_mcp.exposed`` records every one)."""
        await self._store.record_call(call)

    async def cancel(self, task_id: str, *, by: Principal) -> Task:
        """Cancel a queued, running or input_required task; cancelling a cancelled task is a no-op.

        A running task is cancelled in the store only: its worker's own final transition then
        fails the compare-and-set, which is how it learns to stop (within one step). A task
        that already completed or failed cannot be cancelled: that is a ``Conflict``.
        """
        current = await self.get(task_id, by=by)
        if current.status is TaskStatus.CANCELLED:
            return current
        try:
            task = await self._store.transition(
                current.id,
                {TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.INPUT_REQUIRED},
                TaskStatus.CANCELLED,
                error=CANCELLED_BY_CLIENT,
            )
        except IllegalTransition:
            # Lost a race with the worker: report the state it really reached.
            latest = await self._store.get(current.id)
            if latest.status is TaskStatus.CANCELLED:
                return latest
            raise Conflict(
                f"Task {latest.id} already {latest.status.value}; only unfinished tasks "
                "(queued, running, input_required) can be cancelled.",
                task_id=latest.id,
                status=latest.status.value,
            ) from None
        return task

    async def answer(
        self,
        task_id: str,
        request_id: str,
        answer: ApprovalAnswer | Mapping[str, Any],
        *,
        by: Principal,
    ) -> Task:
        """Answer the approval request an ``input_required`` task waits on; the task is queued
        again and any worker resumes it (approved: the tool call runs; denied: the agent is told).

        Scoped like ``cancel``: someone else's task is not found. A task that waits on no request,
        or on another one than ``request_id``, is a ``Conflict`` naming its state and the request
        it waits on, if any.
        """
        if not isinstance(request_id, str) or not request_id.strip():
            raise InvalidInput(
                "request_id is missing or empty; pass the id of the task's pending approval request "
                "(its approval.id).",
                field="request_id",
            )
        checked = _check_answer(answer)
        current = await self.get(task_id, by=by)
        if current.approval is None or current.approval.id != request_id:
            raise _not_waiting_for(current, request_id)
        try:
            return await settle(self._store, self._enqueuer.enqueue, current, checked, by.name)
        except Conflict:
            # Lost a race (another answer, the timeout, a cancel): say what the task does now.
            raise _not_waiting_for(await self._store.get(current.id), request_id) from None

    # -- events ---------------------------------------------------------------------------

    async def events(
        self, task_id: str, after_seq: int = 0, limit: int = 100, *, by: Principal
    ) -> list[TaskEvent]:
        """One page of the task's event log, oldest first, after ``after_seq``."""
        task = await self.get(task_id, by=by)
        _check_seq(after_seq)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= EVENTS_PAGE_MAX:
            raise InvalidInput(f"limit must be an integer from 1 to {EVENTS_PAGE_MAX}.", field="limit")
        return await self._store.events(task.id, after_seq, limit)

    async def watch(
        self, task_id: str, after_seq: int = 0, *, by: Principal
    ) -> AsyncGenerator[TaskEvent, None]:
        """Yield the task's events as they are written, ending once the task is terminal.

        The status is read *before* each batch: if it was already terminal, that batch holds
        every event written before the final transition, so nothing the worker wrote ahead of
        finishing is missed. An unknown id raises on the first iteration.

        Between batches it parks in the store until a write to this task after the last seq
        it yielded wakes it (at most ``poll_interval_s``), so a quiet task costs no reads: the
        store, not a timer per watcher, says when there is something to read.
        """
        task = await self.get(task_id, by=by)
        _check_seq(after_seq)
        seq = after_seq
        while True:
            finished = (await self._store.get(task.id)).status.terminal
            batch = await self._store.events(task.id, seq, EVENTS_PAGE_MAX)
            for event in batch:
                seq = event.seq
                yield event
            if len(batch) == EVENTS_PAGE_MAX:
                continue
            if finished:
                return
            await self._store.wait_for_change(task.id, seq, self._poll_s)

    def check_wait(self, timeout_s: float) -> None:
        """A wait is 0 to ``WAIT_MAX_S`` seconds: longer ones outlive most clients' request timeouts."""
        if (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, int | float)
            or not 0 <= timeout_s <= WAIT_MAX_S
        ):
            raise InvalidInput(f"wait must be a number of seconds from 0 to {WAIT_MAX_S:g}.", field="wait")

    async def wait(
        self, task_id: str, timeout_s: float, on_event: EventCallback | None = None, *, by: Principal
    ) -> Task:
        """Follow the task for up to ``timeout_s`` seconds, calling ``on_event`` for each new event;
        return the task as it is then: terminal, paused for a person (waiting on would only hold
        the caller while nobody answers), or still queued/running if time ran out.

        Every door that offers "submit and wait" uses this, so they all time out the same way.
        A task that already ended (or paused) still has its events replayed to ``on_event``: what
        a caller is told must not depend on whether the worker beat this call to the store.
        """
        self.check_wait(timeout_s)
        task = await self.get(task_id, by=by)
        settled = task.status.terminal or task.status is TaskStatus.INPUT_REQUIRED
        if timeout_s == 0 or (settled and on_event is None):
            return task
        stream = self.watch(task.id, by=by)
        try:
            async with asyncio.timeout(timeout_s):
                async for event in stream:
                    if on_event is not None:
                        await on_event(event)
                    if event.kind == "input_required" and await self._paused(task.id):
                        break
        except TimeoutError:
            pass
        finally:
            await stream.aclose()
        return await self.get(task.id, by=by)

    async def _paused(self, task_id: str) -> bool:
        """Still paused now? The log replays earlier pauses that were answered since."""
        return (await self._store.get(task_id)).status is TaskStatus.INPUT_REQUIRED

    # -- health ---------------------------------------------------------------------------

    def list_servers(self, *, by: Principal) -> list[ServerInfo]:
        """The downstream servers the caller may use, with state and tools, from the pool; of the
        calls made through exposed tools, a non-admin sees only its own."""
        return [
            s
            if by.admin
            else s.model_copy(update={"recent_calls": [c for c in s.recent_calls if c.by == by.name]})
            for s in self._servers.servers_info()
            if by.may_use_server(s.name)
        ]

    async def task_counts(self, *, by: Principal) -> dict[TaskStatus, int]:
        """Every principal's tasks by status (``/metrics``): counts across principals, so admins only."""
        if not by.admin:
            raise Forbidden(
                f"Task counts cover every principal's tasks; {by.name!r} is not an admin. Scrape /metrics "
                'with the token of a principal that has "admin": true in opspawn.server.tokens.'
            )
        return await self._store.count_by_status()

    async def ready(self) -> None:
        """Raise ``Unavailable`` when the service cannot run tasks: the store or the broker is down."""
        try:
            await self._store.ping()
        except OpspawnError:
            raise
        except Exception as exc:
            raise Unavailable(f"The task store cannot be reached: {exc}") from exc
        await self._enqueuer.ping()


def invalid(what: str, exc: ValidationError, *, root: str) -> InvalidInput:
    """A failed validation as the one ``invalid_input`` every door shows: ``Invalid <what>:``
    then each problem as ``path: message`` (``root`` names the whole value)."""
    problems = validation_problems(exc, root=root)
    return InvalidInput(f"Invalid {what}: " + "; ".join(problems) + ".", problems=problems)


def _check_goal(goal: Any) -> None:
    """A missing or blank goal is ``empty_goal``; an over-long one is refused before any
    validation, as a payload too large."""
    if goal is None or (isinstance(goal, str) and not goal.strip()):
        raise empty_goal()
    if isinstance(goal, str) and len(goal) > GOAL_MAX_CHARS:
        raise PayloadTooLarge(
            f"The goal is {len(goal)} characters; the limit is {GOAL_MAX_CHARS}. "
            "Shorten it or move bulky material into a downstream server the agent can read.",
            field="goal",
        )


def empty_goal() -> InvalidInput:
    """A missing, empty or blank goal, in one message at every door (gRPC cannot tell an empty
    goal from a missing one, and neither needs the validator's wording)."""
    return InvalidInput(
        "The goal is empty; say what the agent must do.", field="goal", problems=["goal: must not be empty"]
    )


_ENDPOINT_FIELDS = frozenset({"provider", "base_url", "model", "api_key_env", "api_key"})
"""Fields of the old model settings a client could once set; named in the refusal's message."""


_ID_HINT = Hint("Pass the id {} returned.", "submit")


def _check_id(task_id: str) -> str:
    if not isinstance(task_id, str):
        raise InvalidInput("task_id must be a string.", hint=_ID_HINT, field="task_id")
    if not task_id.strip():
        raise InvalidInput("task_id is empty.", hint=_ID_HINT, field="task_id")
    if "\x00" in task_id:
        raise InvalidInput("task_id must not contain NUL characters.", field="task_id")
    if len(task_id) > TASK_ID_MAX_CHARS:
        raise TaskNotFound(task_id[:TASK_ID_MAX_CHARS] + "...")
    return task_id.strip()


SEQ_MAX = 2**31 - 1
"""Event sequence numbers are 32-bit in the store; a larger ``after_seq`` names no event."""


def _check_seq(after_seq: int) -> None:
    if isinstance(after_seq, bool) or not isinstance(after_seq, int) or not 0 <= after_seq <= SEQ_MAX:
        raise InvalidInput(f"after_seq must be an integer from 0 to {SEQ_MAX}.", field="after_seq")


SEARCH_MAX_CHARS = 200


def _search_text(text: str | None) -> str | None:
    if text is None:
        return None
    if not isinstance(text, str) or "\x00" in text or len(text) > SEARCH_MAX_CHARS:
        raise InvalidInput(
            f"The search text must be at most {SEARCH_MAX_CHARS} characters, without NUL.",
            field="goal_contains",
        )
    return text.strip() or None


def _status(status: TaskStatus | str | None) -> TaskStatus | None:
    if status is None or status == "":
        return None
    try:
        return TaskStatus(status)
    except ValueError:
        names = ", ".join(s.value for s in TaskStatus)
        raise InvalidInput(f"Unknown status {status!r}; use one of {names}.", field="status") from None


def _check_answer(answer: ApprovalAnswer | Mapping[str, Any]) -> ApprovalAnswer:
    if isinstance(answer, ApprovalAnswer):
        return answer
    if not isinstance(answer, Mapping):
        raise InvalidInput(f"An answer must be an object with approve and note, not {type(answer).__name__}.")
    try:
        return ApprovalAnswer.model_validate(dict(answer))
    except ValidationError as exc:
        raise invalid("answer", exc, root="(answer)") from None


def _not_waiting_for(task: Task, request_id: str) -> Conflict:
    """Why an answer does not apply: the task waits on nothing, or on another request."""
    pending = task.approval
    if task.status is not TaskStatus.INPUT_REQUIRED or pending is None:
        return Conflict(
            f"Task {task.id} is {task.status.value}; it waits for no answer (only input_required tasks do).",
            task_id=task.id,
            status=task.status.value,
        )
    return Conflict(
        f"Task {task.id} is input_required and waits on approval request {pending.id!r}, not "
        f"{request_id!r}; answer that one.",
        hint=Hint("Its `approval` (shown by {}) says which tool call it is.", "show_task"),
        task_id=task.id,
        status=task.status.value,
        pending_request_id=pending.id,
    )


def _check_page(limit: Any, cursor: Any) -> None:
    """A page request every list takes: ``limit`` from 1 to ``LIST_PAGE_MAX``, ``cursor`` a string."""
    if cursor is not None and not isinstance(cursor, str):
        raise InvalidInput("cursor must be the next_cursor string of a previous page.", field="cursor")
    if isinstance(cursor, str) and "\x00" in cursor:
        raise InvalidInput("The cursor is not one this server issued.", field="cursor")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= LIST_PAGE_MAX:
        raise InvalidInput(f"limit must be an integer from 1 to {LIST_PAGE_MAX}.", field="limit")
