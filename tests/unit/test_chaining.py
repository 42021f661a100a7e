"""Chaining rules: the chain a request's ``_meta`` carries, the loop and depth refusals (service
and MCP door), the chain a task's calls carry onward, and the guard against processes starting
each other at start (``opspawn_mcp.chaining``)."""

from __future__ import annotations

from typing import Any

import pytest
from mcp import Client

from opspawn_mcp.chaining import (
    CHAIN_ENV,
    CHAIN_META_KEY,
    DEPTH_META_KEY,
    EXTENSION,
    ProcessChain,
    advertised_instance,
    chain_from_meta,
    instance_id,
    outgoing_meta,
)
from opspawn_mcp.config import Config, describe, parse_config
from opspawn_mcp.errors import InvalidInput, LoopDetected
from opspawn_mcp.principals import LOCAL
from opspawn_mcp.server import build_server
from opspawn_mcp.service import TaskService
from opspawn_mcp.store.memory import MemoryStore
from tests.support.service_kit import make_service


def _config(**chaining: Any) -> Config:
    return parse_config({"opspawn": {"store_url": "memory://", "chaining": chaining}}, environ={})


def _meta(*chain: str) -> dict[str, Any]:
    return {CHAIN_META_KEY: list(chain), DEPTH_META_KEY: len(chain)}


@pytest.fixture
def service_b(store: MemoryStore) -> TaskService:
    return make_service(store, config=_config(instance_id="b", max_depth=2))


def test_a_request_without_a_chain_has_an_empty_one() -> None:
    assert chain_from_meta(None) == []
    assert chain_from_meta({"progress_token": 3}) == []
    assert chain_from_meta(_meta("a", "c")) == ["a", "c"]


@pytest.mark.parametrize(
    ("meta", "named"),
    [
        ({CHAIN_META_KEY: "a"}, CHAIN_META_KEY),
        ({CHAIN_META_KEY: ["a b"]}, CHAIN_META_KEY),
        ({CHAIN_META_KEY: [1]}, CHAIN_META_KEY),
        ({DEPTH_META_KEY: 2}, CHAIN_META_KEY),
        ({CHAIN_META_KEY: ["a"], DEPTH_META_KEY: 3}, DEPTH_META_KEY),
        ({CHAIN_META_KEY: ["a"], DEPTH_META_KEY: True}, DEPTH_META_KEY),
    ],
)
def test_a_malformed_chain_is_invalid_input_naming_the_key(meta: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        chain_from_meta(meta)
    assert named in caught.value.message


def test_calls_carry_the_chain_with_this_instance_appended() -> None:
    assert outgoing_meta([], "a") == {CHAIN_META_KEY: ["a"], DEPTH_META_KEY: 1}
    assert outgoing_meta(["a"], "b") == {CHAIN_META_KEY: ["a", "b"], DEPTH_META_KEY: 2}


async def test_a_delegated_goal_keeps_its_chain(service_b: TaskService) -> None:
    task = await service_b.submit({"goal": "echo hi", "chain": ["a"]}, by=LOCAL)
    assert task.spec.chain == ["a"]


async def test_a_goal_coming_back_is_refused_naming_the_loop(service_b: TaskService) -> None:
    with pytest.raises(LoopDetected) as caught:
        await service_b.submit({"goal": "echo hi", "chain": ["a", "b", "c"]}, by=LOCAL)
    assert "a → b → c → b" in caught.value.message
    assert caught.value.status == 403 and caught.value.details["chain"] == ["a", "b", "c"]


async def test_a_goal_delegated_too_often_is_refused_naming_the_limit(service_b: TaskService) -> None:
    await service_b.submit({"goal": "echo hi", "chain": ["a", "c"]}, by=LOCAL)
    with pytest.raises(LoopDetected) as caught:
        await service_b.submit({"goal": "echo hi", "chain": ["a", "c", "d"]}, by=LOCAL)
    assert "opspawn.chaining.max_depth" in caught.value.message and "a → c → d" in caught.value.message


async def test_the_mcp_door_reads_the_chain_from_meta_and_refuses_a_loop(service_b: TaskService) -> None:
    async with Client(build_server(service_b)) as client:
        looped = await client.call_tool("submit_task", {"goal": "echo hi"}, meta=_meta("a", "b"))
        assert looped.is_error
        assert "loop_detected: This goal was delegated in a loop (a → b → b)" in looped.content[0].text  # type: ignore[union-attr]
        ok = await client.call_tool("submit_task", {"goal": "echo hi"}, meta=_meta("a"))
        assert not ok.is_error and ok.structured_content is not None
        task = await service_b.get(ok.structured_content["task_id"], by=LOCAL)
        assert task.spec.chain == ["a"]
        bad = await client.call_tool("submit_task", {"goal": "echo hi"}, meta={CHAIN_META_KEY: "a"})
        assert bad.is_error and "invalid_input" in bad.content[0].text  # type: ignore[union-attr]
        refused = await client.call_tool("submit_task", {"goal": "echo hi", "chain": ["x"]})
        assert refused.is_error and "'chain'" in refused.content[0].text  # type: ignore[union-attr]


async def test_an_opspawn_server_advertises_its_instance(service_b: TaskService) -> None:
    async with Client(build_server(service_b)) as client:
        capabilities = client.server_capabilities
        assert capabilities is not None and capabilities.extensions is not None
        assert capabilities.extensions[EXTENSION] == {"instance_id": "b", "max_depth": 2}
        assert advertised_instance(capabilities.extensions) == "b"
    assert advertised_instance({"io.other/x": {}}) is None


def test_the_instance_is_named_in_the_config_or_derived_from_the_store() -> None:
    assert instance_id(_config(instance_id="alpha")) == "alpha"
    sqlite = {"opspawn": {"store_url": "sqlite+aiosqlite:////tmp/x.db"}}
    one, other = parse_config(sqlite, environ={}), parse_config(sqlite, environ={})
    assert instance_id(one) == instance_id(other) and instance_id(one).startswith("opspawn-")
    elsewhere = parse_config({"opspawn": {"store_url": "sqlite+aiosqlite:////tmp/y.db"}}, environ={})
    assert instance_id(elsewhere) != instance_id(one)


def test_a_process_started_in_a_loop_or_too_deep_does_not_connect_at_start() -> None:
    config = _config(instance_id="a", max_depth=2)
    top = ProcessChain(config, {})
    assert top.connect_at_start and top.stdio_env == {CHAIN_ENV: "a"}
    child = ProcessChain(config, {CHAIN_ENV: "b"})
    assert child.connect_at_start and child.stdio_env == {CHAIN_ENV: "b,a"}
    looped = ProcessChain(config, {CHAIN_ENV: "a,b"})
    assert not looped.connect_at_start and "a → b → a" in (looped.refusal or "")
    deep = ProcessChain(config, {CHAIN_ENV: "c,d"})
    assert not deep.connect_at_start and "max_depth=2" in (deep.refusal or "")


def test_config_check_says_how_this_instance_takes_delegated_goals() -> None:
    named = describe(_config(instance_id="a", max_depth=2))
    assert any(
        line.startswith("delegation: this instance is 'a'") and "more than 2" in line for line in named
    )
    assert any("is named after its store" in line for line in describe(_config()))
