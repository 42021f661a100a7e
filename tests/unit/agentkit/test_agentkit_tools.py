"""@tool schemas, argument validation, error observations and the registry."""

from __future__ import annotations

import threading

import pytest
from pydantic import BaseModel

from agentkit import Tool, ToolError, ToolRegistry, tool
from agentkit.errors import ToolDefinitionError, ToolRegistryError
from agentkit.llm import ToolCall
from agentkit.tools import parse_docstring


@tool
def add(a: int, b: int = 2) -> int:
    """Add two integers.

    Longer explanation that is still part of the summary.

    Args:
        a: The first number,
            continued on a second line.
        b: The second number.

    Returns:
        The sum.
    """
    return a + b


@tool(name="greet_person", description="Say hello.")
async def greet(name: str, shout: bool = False) -> str:
    """Unused summary.

    :param name: Who to greet.
    :param shout: Whether to use capitals.
    """
    text = f"hello {name}"
    return text.upper() if shout else text


def test_schema_comes_from_type_hints_and_docstring() -> None:
    assert add.name == "add"
    assert add.description == "Add two integers. Longer explanation that is still part of the summary."
    assert add.parameters["required"] == ["a"]
    props = add.parameters["properties"]
    assert props["a"] == {"type": "integer", "description": "The first number, continued on a second line."}
    assert props["b"]["default"] == 2
    assert props["b"]["description"] == "The second number."
    assert "title" not in add.parameters


def test_sphinx_docstrings_and_explicit_name() -> None:
    assert greet.name == "greet_person"
    assert greet.description == "Say hello."
    assert greet.parameters["properties"]["name"]["description"] == "Who to greet."
    assert greet.parameters["properties"]["shout"]["type"] == "boolean"


def test_parse_docstring_without_args() -> None:
    assert parse_docstring("Just a summary.") == ("Just a summary.", {})
    assert parse_docstring(None) == ("", {})


async def test_async_and_sync_tools_run_and_coerce() -> None:
    assert (await add.invoke({"a": "3"})).content == "5"
    assert (await greet.invoke({"name": "ada", "shout": True})).content == "HELLO ADA"


async def test_sync_tools_run_off_the_event_loop_thread() -> None:
    @tool
    def where() -> str:
        """Report the thread."""
        return str(threading.get_ident())

    result = await where.invoke({})
    assert result.content != str(threading.get_ident())


async def test_invalid_arguments_become_an_error_observation() -> None:
    result = await add.invoke({"a": "three"}, call_id="c1")
    assert result.is_error
    assert result.call_id == "c1"
    assert "Invalid arguments for tool add" in result.content
    assert "a:" in result.content and '"type": "integer"' in result.content


async def test_missing_argument_is_reported() -> None:
    result = await add.invoke({})
    assert result.is_error and "a: Field required" in result.content


async def test_raising_tools_become_error_observations() -> None:
    @tool
    async def broken(x: int) -> int:
        """Always fails."""
        raise RuntimeError(f"cannot handle {x}")

    @tool
    def picky(x: int) -> int:
        """Refuses odd numbers."""
        if x % 2:
            raise ToolError("x must be even; send an even number")
        return x

    result = await broken.invoke({"x": 1})
    assert result.is_error and "RuntimeError: cannot handle 1" in result.content
    result = await picky.invoke({"x": 1})
    assert result.is_error and result.content == "x must be even; send an even number"  # verbatim
    assert (await picky.invoke({"x": 2})).content == "2"


async def test_structured_return_values_are_json() -> None:
    class Point(BaseModel):
        x: int
        y: int

    @tool
    def point() -> Point:
        """A point."""
        return Point(x=1, y=2)

    @tool
    def mapping() -> dict[str, int]:
        """A mapping."""
        return {"a": 1}

    result = await point.invoke({})
    assert result.content == '{"x":1,"y":2}' and result.structured == {"x": 1, "y": 2}
    assert (await mapping.invoke({})).content == '{"a": 1}'


def test_functions_that_cannot_be_tools_are_refused() -> None:
    def untyped(x):  # type: ignore[no-untyped-def]
        return x

    def variadic(*args: int) -> int:
        return 0

    with pytest.raises(ToolDefinitionError, match="no type hint"):
        tool(untyped)
    with pytest.raises(ToolDefinitionError, match=r"\*args"):
        tool(variadic)
    with pytest.raises(ToolDefinitionError, match="letters, digits"):
        tool(add_numbers, name="add numbers")


def add_numbers(a: int) -> int:
    return a


async def test_registry_add_remove_list_lookup() -> None:
    registry = ToolRegistry([add])
    registry.add(greet)
    assert registry.names() == ["add", "greet_person"]
    assert [t.name for t in registry.tools()] == ["add", "greet_person"]
    assert "add" in registry and len(registry) == 2
    assert registry.get("missing") is None
    assert registry["add"] is add
    with pytest.raises(ToolRegistryError, match="already registered"):
        registry.add(tool(add_numbers, name="add"))
    assert registry.remove("add") is add
    assert "add" not in registry
    with pytest.raises(ToolRegistryError, match="No tool named 'add'"):
        registry.remove("add")
    with pytest.raises(ToolRegistryError):
        registry["add"]
    assert [d.name for d in registry.definitions()] == ["greet_person"]


async def test_registry_call_handles_unknown_tools_and_bad_json() -> None:
    registry = ToolRegistry([add])
    unknown = await registry.call(ToolCall(id="1", name="mul", arguments={}))
    assert unknown.is_error and "no tool named 'mul'" in unknown.content and "add" in unknown.content
    bad = await registry.call(ToolCall(id="2", name="add", raw_arguments="{a: 1"))
    assert bad.is_error and "not a JSON object" in bad.content
    ok = await registry.call(ToolCall(id="3", name="add", arguments={"a": 1, "b": 1}))
    assert ok.content == "2" and ok.call_id == "3" and ok.name == "add"


def test_tool_definition_is_openai_shaped() -> None:
    spec = add.definition().to_openai()
    assert spec["type"] == "function"
    assert spec["function"]["name"] == "add"
    assert spec["function"]["parameters"]["properties"]["a"]["type"] == "integer"
    assert isinstance(add, Tool)


async def test_tools_say_whether_they_are_idempotent() -> None:
    @tool(idempotent=True)
    def read(path: str) -> str:
        """Read a file."""
        return path

    @tool
    def send(to: str) -> str:
        """Send an email."""
        return to

    async def handler(values: dict[str, object]) -> str:
        return "charged"

    charge = Tool("charge", "Charge a card.", {"type": "object", "properties": {}}, handler, idempotent=False)
    assert (read.idempotent, send.idempotent, charge.idempotent) == (True, None, False)
    call = ToolCall(id="1", name="read", arguments={"path": "a"})
    assert await read.idempotent_for(call) is True
    assert await send.idempotent_for(call) is None
    assert await charge.idempotent_for(call) is False
