"""Between the pydantic models and their protobuf mirrors, by field name, through the JSON forms.

Only the wire's differences are spelled out (enum names, ``restrict_servers``).
See docs/grpc.md, "Messages mirror the models".
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from opspawn_mcp.errors import InvalidInput
from opspawn_mcp.grpc_internal.gen import tasks_pb2 as pb
from opspawn_mcp.models import Task, TaskEvent, TaskPage, TaskStatus

_PREFIX = "TASK_STATUS_"


def status_from_pb(value: int) -> TaskStatus | None:
    """``UNSPECIFIED`` (the proto default) means "no filter"; a number the enum does not define
    (proto3 keeps unknown values) is ``InvalidInput``."""
    try:
        name = pb.TaskStatus.Name(value).removeprefix(_PREFIX)
    except ValueError:
        names = ", ".join(pb.TaskStatus.keys())
        raise InvalidInput(f"Unknown status {value}; use one of {names}.", field="status") from None
    return None if name == "UNSPECIFIED" else TaskStatus[name]


def spec_from_pb(spec: pb.TaskSpec) -> dict[str, Any]:
    """The spec as the dict a JSON client would send; unset optional fields are left out,
    so the model's defaults apply exactly as they do for REST and MCP."""
    data: dict[str, Any] = json_format.MessageToDict(spec, preserving_proto_field_name=True)
    restrict = bool(data.pop("restrict_servers", False))
    if "servers" in data or restrict:
        data["servers"] = list(spec.servers)
    return data


def answer_from_pb(request: pb.AnswerTaskRequest) -> dict[str, Any]:
    """The answer as a JSON client would send it: an unset ``approve`` is left out (required,
    so the service refuses it), never read as proto3's default ``false``."""
    data: dict[str, Any] = {}
    if request.HasField("approve"):
        data["approve"] = request.approve
    if request.HasField("note"):
        data["note"] = request.note
    return data


def _tidy_spec(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("servers") is not None:
        spec["restrict_servers"] = True
    return spec


def task_to_pb(task: Task) -> pb.Task:
    data = task.model_dump(mode="json", exclude_none=True, by_alias=False)
    data["status"] = _PREFIX + task.status.name
    data["spec"] = _tidy_spec(data["spec"])
    message = pb.Task()
    json_format.ParseDict(data, message)
    return message


def page_to_pb(page: TaskPage) -> pb.ListTasksResponse:
    response = pb.ListTasksResponse(items=[task_to_pb(t) for t in page.items])
    if page.next_cursor is not None:
        response.next_cursor = page.next_cursor
    return response


def event_to_pb(event: TaskEvent) -> pb.TaskEvent:
    message = pb.TaskEvent()
    json_format.ParseDict(event.model_dump(mode="json"), message)
    return message


def task_from_pb(message: pb.Task) -> Task:
    """For clients and tests: the proto task back as the shared model."""
    data: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    data["status"] = status_from_pb(message.status)
    data["spec"] = spec_from_pb(message.spec)
    return Task.model_validate(data)  # int64 counts arrive as JSON strings, which pydantic reads


def event_from_pb(message: pb.TaskEvent) -> TaskEvent:
    data: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    data["seq"] = message.seq
    data.setdefault("data", {})
    return TaskEvent.model_validate(data)
