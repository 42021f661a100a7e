"""A server's resources, resource templates and prompts, cached like its tools for the exposed view.

See docs/composition.md, "Resources and prompts of exposed servers".
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

import mcp.types as types
from mcp.client.session import ClientSession
from mcp.shared.exceptions import MCPError

logger = logging.getLogger("opspawn_mcp.host")

ExtraKind = Literal["resources", "prompts"]
EXTRA_KINDS: tuple[ExtraKind, ...] = ("resources", "prompts")

_Item = TypeVar("_Item")
_Page = TypeVar("_Page", bound="_Paginated")


class _Paginated(Protocol):
    @property
    def next_cursor(self) -> str | None: ...


async def all_pages(
    fetch: Callable[..., Awaitable[_Page]],
    items: Callable[[_Page], Sequence[_Item]],
) -> list[_Item]:
    """Every item of a paginated list (tools, resources, templates, prompts), following cursors;
    ``fetch`` is the session's list method, called with ``params=``."""
    found: list[_Item] = []
    cursor: str | None = None
    while True:
        page = await fetch(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        found.extend(items(page))
        cursor = page.next_cursor
        if not cursor:
            return found


@dataclass
class Extras:
    """What the server offers besides tools, from its last listings (empty until listed)."""

    resources: list[types.Resource] = field(default_factory=list)
    templates: list[types.ResourceTemplate] = field(default_factory=list)
    prompts: list[types.Prompt] = field(default_factory=list)

    async def load(self, server: str, session: ClientSession, kind: ExtraKind) -> None:
        """List ``kind`` again (resources with their templates, or prompts)."""
        capabilities = session.server_capabilities
        if kind == "resources":
            listed = _Lister(server, capabilities is not None and capabilities.resources is not None)
            self.resources = await listed("resources", session.list_resources, lambda r: r.resources)
            self.templates = await listed(
                "resource templates", session.list_resource_templates, lambda r: r.resource_templates
            )
        else:
            listed = _Lister(server, capabilities is not None and capabilities.prompts is not None)
            self.prompts = await listed("prompts", session.list_prompts, lambda r: r.prompts)


@dataclass
class _Lister:
    """``all_pages``, or nothing when the capability is not offered or the server refuses."""

    server: str
    offered: bool

    async def __call__(
        self, what: str, fetch: Callable[..., Awaitable[_Page]], items: Callable[[_Page], Sequence[_Item]]
    ) -> list[_Item]:
        if not self.offered:
            return []
        try:
            return await all_pages(fetch, items)
        except MCPError as exc:
            logger.warning(
                "MCP server %r refused to list its %s: %s (MCP error %s)",
                self.server,
                what,
                exc.message,
                exc.code,
            )
            return []
