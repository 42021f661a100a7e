"""Errors say what to do next in the words of the door that answers."""

from __future__ import annotations

from opspawn_mcp.errors import ACTIONS, Door, TaskNotFound


def test_a_hint_names_each_doors_own_command_or_route() -> None:
    error = TaskNotFound("t1")
    said = {door: error.message_for(door) for door in Door}
    assert said == {
        Door.MCP: "No task with id 't1'. List tasks with the list_tasks tool to find valid ids.",
        Door.REST: "No task with id 't1'. List tasks with GET /v1/tasks to find valid ids.",
        Door.GRPC: "No task with id 't1'. List tasks with ListTasks to find valid ids.",
        Door.CLI: "No task with id 't1'. List tasks with `opspawn-mcp tasks` to find valid ids.",
        Door.UI: "No task with id 't1'. List tasks with the task list at /ui to find valid ids.",
    }
    assert error.message == said[Door.MCP]
    assert error.problem()["detail"] == said[Door.REST]


def test_every_action_is_named_at_every_door() -> None:
    assert all(set(names) == set(Door) for names in ACTIONS.values())
