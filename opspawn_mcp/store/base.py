"""The Metadata Store contract: one abstract base, three implementations (memory, SQLite, PostgreSQL).

Every status change is ``transition``, a compare-and-set, so exactly one of two writers wins.
See docs/architecture.md, "The store is the truth".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypedDict, TypeVar, Unpack

from pydantic import BaseModel, ConfigDict, Field

from opspawn_mcp.errors import Conflict
from opspawn_mcp.models import (
    ApprovalRequest,
    ExposedCall,
    ExposedCallPage,
    Task,
    TaskEvent,
    TaskPage,
    TaskStatus,
    Usage,
    utcnow,
)
from opspawn_mcp.store._common import (
    allowed_from,
    as_utc,
    check_kind,
    check_limit,
    decode_cursor,
    encode_cursor,
    gives_back_attempt,
    state_event,
    transition_values,
)

JournalKind = Literal["llm", "tool_started", "tool_finished", "approval"]


class JournalRow(BaseModel):
    """One stored journal entry: what the agent finished (or started) at one point of a run.

    The fields are agentkit's ``JournalEntry`` (kind, ordinal, step, data) plus the ``attempt``
    that wrote it, so a resumed attempt can tell its own entries from its predecessors'. The
    key is ``(task, kind, ordinal)``: an entry is written once, and a second write of the same
    key (a replay that forgot it was replaying) is a ``Conflict``, never a silent overwrite.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: JournalKind
    ordinal: int = Field(ge=0)
    step: int = Field(ge=0)
    attempt: int = Field(default=0, ge=0)
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def order(self) -> tuple[int, int]:
        """Where it stands in ``TaskStore.journal``: by ordinal, then in ``JOURNAL_KIND_ORDER``."""
        return self.ordinal, JOURNAL_KIND_ORDER[self.kind]


# Entries of one ordinal in the order a run makes them: the model's answer, then a person's
# answer to its tool call, the call starting and finishing. Both stores sort with it, so their
# journals read back identically.
JOURNAL_KIND_ORDER: dict[JournalKind, int] = {"llm": 0, "approval": 1, "tool_started": 2, "tool_finished": 3}


class JournalKeyTaken(Conflict):
    """A second write of one journal key: a replay re-ran finished work, so it is refused loudly
    (and nothing else the transaction wrote is kept)."""

    def __init__(self, task_id: str, row: JournalRow) -> None:
        super().__init__(
            f"Task {task_id} already has a {row.kind!r} journal entry with ordinal {row.ordinal}; an entry "
            "is written once (a resumed run must replay it, not record it again).",
            task_id=task_id,
        )


class KeyTaken(Conflict):
    """``create`` of a task whose principal already used its idempotency key: nothing was
    written, and ``task`` is the task holding the key (``TaskService.submit`` answers it)."""

    def __init__(self, task: Task) -> None:
        super().__init__(
            f"The idempotency key {task.idempotency_key!r} is taken by task {task.id}.", task_id=task.id
        )
        self.task = task


_Row = TypeVar("_Row", Task, ExposedCall)


class Outcome(TypedDict, total=False):
    """What a transition records of how the task got there: the answer (``result``) or the
    ``error``, the ``state`` event's ``reason`` (default: the error) and the completed task's
    ``warning`` (``TaskStore.transition``; ``TaskRunner._finish`` forwards a run's)."""

    result: str
    error: str
    reason: str | None
    warning: str | None


@dataclass(frozen=True, slots=True)
class Window:
    """One keyset page as a backend reads it: the rows whose fields equal ``match`` (and whose
    goal contains ``goal_contains``, ignoring case: tasks only), strictly older than ``after``
    (the decoded cursor), newest first, at most ``limit + 1`` of them: the extra row only says
    that a next page exists."""

    limit: int
    after: tuple[datetime, str] | None
    match: Mapping[str, str]
    goal_contains: str = ""

    @classmethod
    def of(cls, limit: int, cursor: str | None, goal_contains: str = "", **match: str | None) -> Window:
        """The window a caller's ``limit`` and ``cursor`` ask for; a None filter keeps everything."""
        check_limit(limit)
        after = decode_cursor(cursor) if cursor else None
        return cls(limit, after, {k: v for k, v in match.items() if v is not None}, goal_contains)

    def cut(
        self, rows: Sequence[_Row], key: Callable[[_Row], tuple[datetime, str]]
    ) -> tuple[list[_Row], str | None]:
        """The page and its ``next_cursor`` (None on the last page)."""
        page = list(rows[: self.limit])
        return page, encode_cursor(*key(page[-1])) if len(rows) > self.limit else None


@dataclass(frozen=True, slots=True)
class Move:
    """One transition as ``TaskStore.transition`` checked it, for a backend to apply at once.

    ``allowed`` is the part of ``expected`` from which ``new`` is legal (empty: it cannot win,
    and the backend only says why); ``values`` are the fields it writes (``transition_values``:
    ``usage`` and ``approval`` still models); ``state`` is the data of the ``state`` event
    written with it, ``event`` the event just before that one, if any."""

    task_id: str
    new: TaskStatus
    allowed: tuple[TaskStatus, ...]
    owner: str | None
    values: Mapping[str, Any]
    state: dict[str, Any]
    event: tuple[str, dict[str, Any]] | None
    entries: Sequence[JournalRow]

    @property
    def refund(self) -> bool:
        """Whether the claim's attempt is given back (``gives_back_attempt``)."""
        return gives_back_attempt(self.new)


@dataclass(frozen=True, slots=True)
class Progress:
    """One agent event as ``TaskStore.record`` checked it: the event, the steps and usage so
    far and the journal entries, written only while ``owner`` holds the running task."""

    task_id: str
    owner: str
    kind: str
    data: dict[str, Any]
    steps: int
    usage: Usage
    entries: Sequence[JournalRow]


class TaskStore(ABC):
    """The contract every backend keeps (tests/integration/test_store_contract.py runs it on
    each). The methods whose arguments need checking (``transition``, ``record``, the two
    lists) are stated and checked here once and hand a backend one checked value (``Move``,
    ``Progress``, ``Window``); a backend implements the rest as they stand."""

    @abstractmethod
    async def start(self) -> None:
        """Connect and create or migrate the schema (idempotent)."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ping(self) -> None:
        """Raise ``Unavailable`` when the store cannot be reached (used by readiness checks)."""

    @abstractmethod
    async def create(self, task: Task) -> Task:
        """Insert the task and, in the same transaction, its first event (seq 1): the ``state``
        event of its initial status, so no reader ever sees a task without it. Raises
        ``Conflict`` for an id that exists, and ``KeyTaken`` (naming the task that holds it)
        when ``task.idempotency_key`` is set and its principal already has a task with it."""

    @abstractmethod
    async def get_by_key(self, principal: str, key: str) -> Task | None:
        """``principal``'s task created with idempotency key ``key``, or None."""

    @abstractmethod
    async def get(self, task_id: str) -> Task:
        """Raise ``TaskNotFound`` for an unknown id."""

    async def list_tasks(
        self,
        status: TaskStatus | None = None,
        limit: int = 50,
        cursor: str | None = None,
        *,
        principal: str | None = None,
        goal_contains: str | None = None,
    ) -> TaskPage:
        """Newest first; ``cursor`` is the opaque ``next_cursor`` of the previous page;
        ``principal`` keeps only that principal's tasks (None: everyone's), ``goal_contains``
        only tasks whose goal contains that text, ignoring case (``%`` and ``_`` are literal)."""
        wanted = None if status is None else TaskStatus(status).value
        window = Window.of(limit, cursor, goal_contains or "", status=wanted, principal=principal)
        items, next_cursor = window.cut(await self._list_tasks(window), lambda t: (t.created_at, t.id))
        return TaskPage(items=items, next_cursor=next_cursor)

    @abstractmethod
    async def _list_tasks(self, window: Window) -> list[Task]:
        """The tasks of ``window``."""

    @abstractmethod
    async def mark_enqueued(self, task_id: str) -> None:
        """The broker confirmed the message of this queued task (the outbox's "sent" mark)."""

    async def unenqueued(self, created_before: datetime, limit: int = 100) -> list[str]:
        """Queued tasks created before ``created_before`` whose message no broker confirmed
        (its publish failed, or the publisher died first), oldest first: the recovery loop
        publishes them. A task put back in the queue by a transition counts again."""
        check_limit(limit)
        return await self._unenqueued(as_utc(created_before), limit)

    @abstractmethod
    async def _unenqueued(self, cutoff: datetime, limit: int) -> list[str]:
        """``unenqueued`` with its arguments checked."""

    @abstractmethod
    async def count_active(self, principal: str) -> int:
        """How many of ``principal``'s tasks are not finished (queued, running or waiting for
        input: its tasks in flight)."""

    @abstractmethod
    async def count_by_status(self) -> dict[TaskStatus, int]:
        """Every principal's tasks by status, every status present (zero counts too): one
        grouped count, cheap enough for each ``/metrics`` scrape."""

    async def transition(
        self,
        task_id: str,
        expected: Collection[TaskStatus],
        new: TaskStatus,
        *,
        usage: Usage | None = None,
        owner: str | None = None,
        approval: ApprovalRequest | None = None,
        event: tuple[str, dict[str, Any]] | None = None,
        entries: Sequence[JournalRow] = (),
        **outcome: Unpack[Outcome],
    ) -> Task:
        """Atomically move the task to ``new`` if its status is in ``expected`` and the move is
        legal (and, when ``owner`` is given, the task's lease belongs to ``owner``).

        In the same transaction it appends the ``state`` event ``{"status": new, "reason": ...}``
        (``reason`` defaults to ``error``), so a reader that sees the new status also sees its
        event: a watcher that stops at a terminal status never misses the final state event.
        ``event`` (kind, data) is appended just before it, and the journal ``entries`` are
        inserted (as ``record``; a key that exists is ``Conflict`` and nothing is written): how a
        task pauses for approval and how the answer resumes it, each as one transaction.

        Sets ``started_at`` on entering running and ``finished_at`` on a terminal state; leaving
        running clears the lease. ``approval`` is required exactly when ``new`` is
        ``input_required`` and is cleared by every other transition; pausing gives the claim's
        attempt back. ``warning`` is stored with the task (``Task.warning``: why a completed
        answer needs checking). Raises ``TaskNotFound`` or ``IllegalTransition``.
        """
        new = TaskStatus(new)
        if event is not None:
            check_kind(event[0])
        allowed = tuple(allowed_from(expected, new))
        # A move no status allows writes nothing (the backend only says why), so it needs no values.
        if unknown := outcome.keys() - Outcome.__optional_keys__:
            raise TypeError(f"transition() got unexpected keyword arguments {sorted(unknown)}")
        result, error, warning = outcome.get("result"), outcome.get("error"), outcome.get("warning")
        values = (
            transition_values(
                new, utcnow(), result=result, error=error, usage=usage, approval=approval, warning=warning
            )
            if allowed
            else {}
        )
        state = state_event(new, outcome.get("reason") or error)
        return await self._move(Move(task_id, new, allowed, owner, values, state, event, entries))

    @abstractmethod
    async def _move(self, move: Move) -> Task:
        """Apply ``move`` as one transaction and answer the moved task, or raise
        ``TaskNotFound`` or ``IllegalTransition`` (nothing written)."""

    @abstractmethod
    async def claim(self, task_id: str, owner: str, ttl_s: float, max_attempts: int) -> Task | None:
        """Take the task for ``owner``: ``queued -> running``, or a ``running`` task whose lease
        has expired. Counts an attempt and sets the lease. Returns None if someone else holds it,
        it is terminal, or it has reached ``max_attempts`` (the caller then fails it)."""

    @abstractmethod
    async def renew(self, task_id: str, owner: str, ttl_s: float) -> bool:
        """Extend the lease if ``owner`` still holds it; False means the task was lost."""

    @abstractmethod
    async def renew_many(self, leases: Mapping[str, str], ttl_s: float) -> set[str]:
        """Extend every lease in ``leases`` (task id -> owner) in one statement: a worker process
        renews all its running tasks in one round trip instead of one per task. Returns the ids
        still held (running, same owner); a missing id was lost (cancelled, finished, taken
        over or unknown)."""

    async def expired(self, now: datetime | None = None, limit: int = 100) -> list[Task]:
        """Running tasks whose lease expired before ``now``: the recovery loop re-runs them."""
        check_limit(limit)
        return await self._past_deadline(TaskStatus.RUNNING, as_utc(now or utcnow()), limit)

    async def expired_approvals(self, now: datetime | None = None, limit: int = 100) -> list[Task]:
        """``input_required`` tasks whose request expired before ``now``, oldest deadline first:
        the recovery loop answers them as denied."""
        check_limit(limit)
        return await self._past_deadline(TaskStatus.INPUT_REQUIRED, as_utc(now or utcnow()), limit)

    @abstractmethod
    async def _past_deadline(self, status: TaskStatus, cutoff: datetime, limit: int) -> list[Task]:
        """Up to ``limit`` tasks in ``status`` whose deadline (a running task's lease, a paused
        one's request) is before ``cutoff``, oldest deadline first."""

    @abstractmethod
    async def record_progress(self, task_id: str, steps: int, usage: Usage) -> None:
        """Store the step count and token usage so far (shown by get_status while running)."""

    async def append_event(self, task_id: str, kind: str, data: dict[str, Any]) -> TaskEvent:
        """Append with the next ``seq`` for that task (1, 2, 3...), unique even under races.

        Once the task is terminal only ``state`` events are accepted; anything else raises
        ``Conflict`` (checked under the same lock as the append, so it cannot race a cancel)."""
        check_kind(kind)
        return await self._append_event(task_id, kind, data)

    @abstractmethod
    async def _append_event(self, task_id: str, kind: str, data: dict[str, Any]) -> TaskEvent:
        """``append_event`` with its kind checked."""

    async def record(
        self,
        task_id: str,
        owner: str,
        kind: str,
        data: dict[str, Any],
        *,
        steps: int,
        usage: Usage,
        entries: Sequence[JournalRow] = (),
    ) -> TaskEvent | None:
        """One agent event as one transaction, only while ``owner`` holds the running task:
        append the event (as ``append_event``), store ``steps`` and ``usage`` (as
        ``record_progress``) and insert the journal ``entries``: the facts the event announces,
        and those that have no event of their own (agentkit's planner and memory model calls),
        held until the next event so they cost no transaction.

        Returns the event, or None when the task is not ``owner``'s running task any more
        (cancelled, finished, or taken over): then nothing is written, and the caller stops.
        A journal entry whose key exists raises ``Conflict`` and writes nothing either.
        Raises ``TaskNotFound`` for an unknown id."""
        check_kind(kind)
        return await self._record(Progress(task_id, owner, kind, data, steps, usage, entries))

    @abstractmethod
    async def _record(self, progress: Progress) -> TaskEvent | None:
        """Write ``progress`` as one transaction (see ``record``)."""

    @abstractmethod
    async def journal(self, task_id: str) -> list[JournalRow]:
        """The task's journal, each kind's entries in ordinal order. Ordinals count per kind
        (as agentkit's do: the nth model call, the nth tool call), so the order across kinds
        is not the run's chronology; entries of one ordinal come llm, tool_started,
        tool_finished. Raises ``TaskNotFound`` for an unknown id."""

    async def events(self, task_id: str, after_seq: int = 0, limit: int = 1000) -> list[TaskEvent]:
        """The task's events after ``after_seq`` in order, at most ``limit``. Raises
        ``TaskNotFound`` for an unknown id."""
        check_limit(limit)
        return await self._events(task_id, after_seq, limit)

    @abstractmethod
    async def _events(self, task_id: str, after_seq: int, limit: int) -> list[TaskEvent]:
        """``events`` with its limit checked."""

    @abstractmethod
    async def wait_for_change(self, task_id: str, seq: int, timeout_s: float) -> bool:
        """Park until the task has (or may have) an event after ``seq``; True then, False when
        ``timeout_s`` passed first. Watchers call it between reads instead of sleeping.

        Every event write (``create``, ``append_event``, ``record``, ``transition``) wakes the
        waiters of its task once its transaction committed: in process at once, across
        processes through PostgreSQL ``NOTIFY``, else through one shared poll per store. A
        True may be spurious (re-read and wait again); an unknown task simply times out.
        Callers still bound the wait: a lost wakeup then costs ``timeout_s``, never an event."""

    @abstractmethod
    async def record_call(self, call: ExposedCall) -> None:
        """Keep one exposed call for the audit (``list_calls``); a call id stored twice is ``Conflict``."""

    async def list_calls(
        self,
        limit: int = 50,
        cursor: str | None = None,
        *,
        principal: str | None = None,
        server: str | None = None,
    ) -> ExposedCallPage:
        """Exposed calls newest first, one page at a time (``cursor``: the previous page's
        ``next_cursor``), only ``principal``'s and only ``server``'s when given."""
        window = Window.of(limit, cursor, principal=principal, server=server)
        calls, next_cursor = window.cut(await self._list_calls(window), lambda c: (c.at, c.id))
        return ExposedCallPage(calls=calls, next_cursor=next_cursor)

    @abstractmethod
    async def _list_calls(self, window: Window) -> list[ExposedCall]:
        """The calls of ``window``."""
