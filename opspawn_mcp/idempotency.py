"""Idempotent submits: a repeated ``submit_task`` with the same key answers the task it created.

The key is scoped by principal, and the same key with a different request is a ``Conflict``.
See docs/reliability.md, "Idempotent submits".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from agentkit.journal import IDEMPOTENCY_META_KEY
from opspawn_mcp.errors import Conflict, InvalidInput
from opspawn_mcp.models import Task, TaskSpec

KEY_MAX_CHARS = 200
KEY_PATTERN = rf"^[\x21-\x7e]{{1,{KEY_MAX_CHARS}}}$"
_KEY = re.compile(KEY_PATTERN)
"""Printable ASCII without spaces, as an HTTP header carries it; agentkit's keys are
``{run_id}:{step}:{ordinal}``."""
HEADER = "Idempotency-Key"


def check_key(key: Any, *, field: str) -> str | None:
    """``key`` if it is one (None when absent), else ``InvalidInput`` naming ``field``."""
    if key is None:
        return None
    if not isinstance(key, str) or not _KEY.match(key):
        raise InvalidInput(
            f"{field} must be 1 to {KEY_MAX_CHARS} printable ASCII characters without spaces "
            "(the same key for a repeated submit of the same task).",
            field=field,
        )
    return key


def key_from_meta(meta: Mapping[str, Any] | None) -> str | None:
    """The idempotency key an MCP request's ``_meta`` carries, checked."""
    if not meta:
        return None
    return check_key(meta.get(IDEMPOTENCY_META_KEY), field=f"_meta.{IDEMPOTENCY_META_KEY}")


def repeated(existing: Task, spec: TaskSpec) -> Task:
    """``existing`` when ``spec`` is the request that created it, else the ``Conflict`` saying
    which fields differ."""
    if existing.spec == spec:
        return existing
    before, now = existing.spec.model_dump(mode="json"), spec.model_dump(mode="json")
    differ = sorted(name for name in now if before.get(name) != now.get(name))
    raise Conflict(
        f"The idempotency key {existing.idempotency_key!r} was used for task {existing.id} with a "
        f"different request ({', '.join(differ)} differ); repeat a submit with the same arguments, "
        "or send a new key for a new task.",
        task_id=existing.id,
        fields=differ,
    )
