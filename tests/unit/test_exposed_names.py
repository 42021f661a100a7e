"""``exposed_name``: every downstream tool gets a valid MCP tool name, and no two share one."""

from __future__ import annotations

import re

import pytest

from opspawn_mcp.exposed import exposed_name

VALID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def test_a_plain_pair_keeps_its_readable_name() -> None:
    assert exposed_name("github", "create_issue") == "github__create_issue"


@pytest.mark.parametrize(
    ("server", "tool"),
    [
        ("fs.local", "read"),  # '.' is a valid server name character, not a tool name one
        ("fs", "read file"),
        ("fs", "ünïcode"),
        ("s", "t" * 80),
        ("a" * 64, "b" * 64),
    ],
)
def test_names_that_would_be_invalid_are_shortened_with_a_hash(server: str, tool: str) -> None:
    name = exposed_name(server, tool)
    assert VALID.match(name), name
    assert name.startswith("_") and name == exposed_name(server, tool)  # deterministic


def test_pairs_that_would_join_to_the_same_name_get_different_names() -> None:
    clashing = [("a__b", "c"), ("a", "b__c"), ("a", "b" + "_" * 2 + "c")]
    names = {exposed_name(server, tool) for server, tool in clashing}
    assert len(names) == 2  # the last two pairs are the same pair
    assert exposed_name("a", "b__c") == "a__b__c"
    long = {exposed_name("s", "x" * 70 + str(i)) for i in range(100)}
    assert len(long) == 100 and all(VALID.match(n) for n in long)
