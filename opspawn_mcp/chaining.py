"""Chaining: opspawn instances delegating goals to each other, without loops.

The chain a request carries in ``_meta``, the ``loop_detected`` refusal, and ``OPSPAWN_CHAIN`` for
the processes the pool starts. See docs/composition.md, "Chaining" ("Loops and depth").
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from mcp.server.extension import Extension

from opspawn_mcp.config import Config, redact_url
from opspawn_mcp.errors import InvalidInput, LoopDetected
from opspawn_mcp.models import CHAIN_MAX_LENGTH, INSTANCE_ID_PATTERN

CHAIN_META_KEY = "io.opspawn/chain"
DEPTH_META_KEY = "io.opspawn/depth"
OPSPAWN_NAME = "opspawn"
"""The ``serverInfo.name`` of opspawn's MCP server."""
CHAIN_ENV = "OPSPAWN_CHAIN"
"""The chain of the process that started a stdio server, comma-separated, that process last."""
EXTENSION = "io.opspawn/chaining"
"""The capability an opspawn server advertises (settings: ``instance_id``, ``max_depth``), so a
client's pool knows a downstream server is an opspawn instance and which."""

_INSTANCE_ID = re.compile(INSTANCE_ID_PATTERN)


def instance_id(config: Config) -> str:
    """This instance's name in a chain: ``opspawn.chaining.instance_id``, else derived from the
    store (every process sharing a store is one instance: a task may run on any of them).

    A SQLite file is only shared on one machine, so its id includes the host name; a memory
    store is never shared, so its id is this process's.
    """
    named = config.opspawn.chaining.instance_id
    if named is not None:
        return named
    url = config.opspawn.store_url
    if url.startswith("memory://"):
        where = f"{socket.gethostname()}:{os.getpid()}"
    elif url.startswith("sqlite"):
        where = f"{socket.gethostname()}:{url}"
    else:
        where = redact_url(url)
    return "opspawn-" + hashlib.sha256(where.encode()).hexdigest()[:12]


def shown(chain: Sequence[str]) -> str:
    return " → ".join(chain)


def chain_from_meta(meta: Mapping[str, Any] | None) -> list[str]:
    """The chain a request's ``_meta`` carries (``[]`` for a request no opspawn sent).

    A malformed one is ``InvalidInput`` naming the key: a list of instance ids, and a depth
    (when given) equal to its length.
    """
    if not meta:
        return []
    chain = meta.get(CHAIN_META_KEY)
    depth = meta.get(DEPTH_META_KEY)
    if chain is None and depth in (None, 0):
        return []
    if (
        not isinstance(chain, list)
        or len(chain) > CHAIN_MAX_LENGTH
        or not all(isinstance(i, str) and _INSTANCE_ID.match(i) for i in chain)
    ):
        raise InvalidInput(
            f"_meta {CHAIN_META_KEY} must be a list of at most {CHAIN_MAX_LENGTH} opspawn instance ids "
            f"(matching {INSTANCE_ID_PATTERN}), oldest first.",
            field=f"_meta.{CHAIN_META_KEY}",
        )
    if depth is not None and (isinstance(depth, bool) or depth != len(chain)):
        raise InvalidInput(
            f"_meta {DEPTH_META_KEY} ({depth!r}) must equal the length of {CHAIN_META_KEY} ({len(chain)}).",
            field=f"_meta.{DEPTH_META_KEY}",
        )
    return list(chain)


def check_chain(chain: Sequence[str], me: str, max_depth: int) -> None:
    """Refuse a goal that came back to this instance, or through too many instances."""
    if me in chain:
        raise LoopDetected(
            f"This goal was delegated in a loop ({shown([*chain, me])}): opspawn instance {me!r} is "
            "already working on it further up the chain, so it refused this task. Do the work with "
            "your other tools, or answer without delegating it.",
            chain=list(chain),
            instance=me,
        )
    if len(chain) > max_depth:
        raise LoopDetected(
            f"This goal was delegated through {len(chain)} opspawn instances ({shown(chain)}); "
            f"instance {me!r} takes goals delegated through at most {max_depth} "
            "(opspawn.chaining.max_depth), so it refused this task. Do the work without delegating "
            "it further.",
            chain=list(chain),
            instance=me,
            max_depth=max_depth,
        )


def outgoing_meta(chain: Sequence[str], me: str) -> dict[str, Any]:
    """The ``_meta`` entries of every downstream call a task of this instance makes."""
    return {CHAIN_META_KEY: [*chain, me], DEPTH_META_KEY: len(chain) + 1}


def relay_meta(meta: Mapping[str, Any] | None, me: str, max_depth: int) -> dict[str, Any]:
    """The ``_meta`` of a call relayed for a caller (an exposed tool): the caller's chain,
    checked like a submitted goal's, with this instance appended."""
    chain = chain_from_meta(meta)
    check_chain(chain, me, max_depth)
    return outgoing_meta(chain, me)


def process_chain(environ: Mapping[str, str]) -> list[str]:
    """The chain this process inherited from the opspawn that started it (``OPSPAWN_CHAIN``)."""
    return [i for i in environ.get(CHAIN_ENV, "").split(",") if _INSTANCE_ID.match(i)]


def child_env(chain: Sequence[str], me: str) -> dict[str, str]:
    """The environment entry of every stdio server this process starts."""
    return {CHAIN_ENV: ",".join([*chain, me])}


def start_refusal(chain: Sequence[str], me: str, max_depth: int) -> str | None:
    """Why this process must not connect its downstream servers at start, or None."""
    if me in chain:
        return (
            f"started by a chain of opspawn processes that loops ({shown([*chain, me])}); "
            "its downstream servers connect on first use only"
        )
    if chain and len(chain) >= max_depth:
        return (
            f"started by a chain of {len(chain)} opspawn processes ({shown([*chain, me])}), "
            f"opspawn.chaining.max_depth={max_depth}; its downstream servers connect on first use only"
        )
    return None


class ProcessChain:
    """What a process that owns a pool (``serve``, ``worker``) takes from its inherited chain:
    the environment of the stdio servers it starts, and whether to connect them at start."""

    def __init__(self, config: Config, environ: Mapping[str, str] | None = None) -> None:
        me = instance_id(config)
        inherited = process_chain(os.environ if environ is None else environ)
        self.stdio_env = child_env(inherited, me)
        self.refusal = start_refusal(inherited, me, config.opspawn.chaining.max_depth)
        """Why this process must not connect its servers at start (it is logged), or None."""

    @property
    def connect_at_start(self) -> bool:
        return self.refusal is None


class ChainingExtension(Extension):
    """Advertises ``io.opspawn/chaining`` with this instance's id and depth limit; no methods."""

    identifier = EXTENSION

    def __init__(self, instance: str, max_depth: int) -> None:
        self.instance = instance
        self.max_depth = max_depth

    def settings(self) -> dict[str, Any]:
        return {"instance_id": self.instance, "max_depth": self.max_depth}


def advertised_instance(extensions: Mapping[str, Any] | None) -> str | None:
    """The instance id a server advertises under ``capabilities.extensions``; None if none."""
    settings = (extensions or {}).get(EXTENSION)
    if not isinstance(settings, Mapping):
        return None
    named = settings.get("instance_id")
    return named if isinstance(named, str) and _INSTANCE_ID.match(named) else None
