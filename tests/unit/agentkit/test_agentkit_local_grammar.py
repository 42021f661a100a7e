"""The grammars ``LocalGGUF`` hands to llama.cpp: safe for any tool schema, exact where possible.

llama.cpp parses a grammar recursively, one level per nested group, in the thread that runs the
model; a grammar nested thousands deep (what ``json_schema_to_gbnf`` writes for an ordinary
``"maxLength": 100000``) overflows that thread's stack and the process dies with SIGSEGV. These
tests pin the bounds on the text; tests/integration/test_agentkit_local_llm.py loads such
grammars into the real model.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any

import pytest

from agentkit.llm.local import (
    ANY_JSON_OBJECT,
    BOUNDED_OBJECT,
    MAX_GRAMMAR_DEPTH,
    REPEAT_LIMIT,
    bounded_schema,
    compact_schema,
    grammar_depth,
    grammar_for_schema,
)
from tests.support.services import unavailable

ECHO = {
    "type": "object",
    "properties": {"text": {"type": "string", "maxLength": 100_000, "description": "Text to send back."}},
    "required": ["text"],
}
PROXY = {
    "type": "object",
    "properties": {
        "server": {"type": "string"},
        "tool": {"type": "string"},
        "arguments": {"type": "object", "description": "Arguments for the tool."},
    },
    "required": ["server", "tool"],
}


@pytest.fixture
def converter() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        unavailable("llama-cpp-python (pip install 'opspawn[local-llm]')")


def test_large_length_and_item_bounds_are_dropped_small_ones_kept() -> None:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "text": {"type": "string", "maxLength": 100_000, "minLength": 5_000},
            "code": {"type": "string", "maxLength": REPEAT_LIMIT, "minLength": 2},
            "xs": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 9_000},
        },
    }
    bounded = bounded_schema(schema)
    props = bounded["properties"]
    assert props["text"] == {"type": "string"}
    assert props["code"] == {"type": "string", "maxLength": REPEAT_LIMIT, "minLength": 2}
    assert props["xs"] == {"type": "array", "items": {"type": "integer"}, "minItems": 1}
    assert schema["properties"]["text"]["maxLength"] == 100_000  # the tool's own schema is untouched


def test_a_property_named_like_a_bound_is_still_a_property() -> None:
    schema = {"type": "object", "properties": {"maxLength": {"type": "integer"}}, "required": ["maxLength"]}
    assert bounded_schema(schema) == schema


def test_literal_values_are_kept_as_they_are() -> None:
    schema = {"type": "object", "properties": {"x": {"const": {"maxLength": 100_000}}}}
    assert bounded_schema(schema) == schema


def test_nested_free_form_objects_are_bounded_the_top_level_one_is_not() -> None:
    arguments = bounded_schema(PROXY)["properties"]["arguments"]
    assert arguments == {**BOUNDED_OBJECT, "description": "Arguments for the tool."}
    assert bounded_schema({"type": "object"}) == {"type": "object"}
    typed = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}}},
    }
    assert bounded_schema(typed) == typed


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ('root ::= "a"', 0),
        ('root ::= ("a" ("b")?)?', 2),
        (r'root ::= "(((" [(] "\"(" x', 0),  # parentheses inside literals and classes
        ('root ::= x # ((((\nx ::= ("y")', 1),  # and in comments
    ],
)
def test_grammar_depth_counts_groups_only(text: str, depth: int) -> None:
    assert grammar_depth(text) == depth


@pytest.mark.usefixtures("converter")
@pytest.mark.parametrize(
    "schema",
    [
        ECHO,
        PROXY,
        {"type": "object", "properties": {"c": {"type": "string", "pattern": "^[a-z]{1,5000}$"}}},
        {"type": "object", "properties": {"xs": {"type": "array", "maxItems": 100_000}}},
        {"$ref": "#"},
        {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}},
        {"type": "object", "properties": {"x": {"type": "no-such-type"}}},
        {},
    ],
    ids=["maxLength", "proxy", "pattern", "maxItems", "self-ref", "ref-loop", "unknown-type", "empty"],
)
def test_every_schema_gives_a_grammar_llama_cpp_can_parse(schema: dict[str, Any]) -> None:
    grammar = grammar_for_schema(schema)
    assert grammar_depth(grammar) <= MAX_GRAMMAR_DEPTH
    assert re.search(r"^root\s*::=", grammar, re.MULTILINE)


@pytest.mark.usefixtures("converter")
def test_a_bounded_schema_still_gets_its_exact_grammar() -> None:
    grammar = grammar_for_schema(ECHO)
    assert grammar != ANY_JSON_OBJECT
    assert '"\\"text\\""' in grammar  # the required key is spelled out, not any object


@pytest.mark.usefixtures("converter")
def test_what_the_converter_cannot_do_falls_back_to_any_object() -> None:
    assert grammar_for_schema({"$ref": "#/nowhere"}) == ANY_JSON_OBJECT


def test_the_prompt_lists_arguments_by_name_and_type_only() -> None:
    assert compact_schema(ECHO) == {"text": "string"}
    assert compact_schema(PROXY) == {"server": "string", "tool": "string", "arguments": "object"}
    schema = {"properties": {"unit": {"enum": ["c", "f"]}, "n": {"type": ["integer", "null"]}, "x": {}}}
    assert compact_schema(schema) == {"unit": 'one of ["c", "f"]', "n": "integer | null", "x": "any"}
    assert compact_schema({"type": "object"}) == {}
