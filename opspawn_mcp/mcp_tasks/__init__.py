"""MCP Tasks (SEP-2663, ``io.modelcontextprotocol/tasks``) as an SDK extension over a task backend.

``TasksExtension`` speaks the wire (``serve_task_notifications`` adds ``notifications/tasks`` on
``subscriptions/listen``, which no extension can bind); a ``TaskBackend`` runs and stores the tasks: opspawn's
``TaskService`` (``opspawn_mcp.server``) or coroutines in memory
(``opspawn_mcp.mcp_tasks.memory``). Design and status mapping: docs/mcp-server.md.
"""

from opspawn_mcp.mcp_tasks.backend import TaskBackend, TaskSupport, UnknownTask
from opspawn_mcp.mcp_tasks.extension import TasksExtension, declares_tasks
from opspawn_mcp.mcp_tasks.listen import serve_task_notifications
from opspawn_mcp.mcp_tasks.wire import (
    TASKS_EXTENSION,
    CancelTaskRequest,
    CreateTaskResult,
    DetailedTask,
    GetTaskRequest,
    Task,
    TaskStatusName,
    TaskStatusNotification,
    UpdateTaskRequest,
)

__all__ = [
    "TASKS_EXTENSION",
    "CancelTaskRequest",
    "CreateTaskResult",
    "DetailedTask",
    "GetTaskRequest",
    "Task",
    "TaskBackend",
    "TaskStatusName",
    "TaskStatusNotification",
    "TaskSupport",
    "TasksExtension",
    "UnknownTask",
    "UpdateTaskRequest",
    "declares_tasks",
    "serve_task_notifications",
]
