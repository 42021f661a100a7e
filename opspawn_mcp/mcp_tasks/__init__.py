"""MCP Tasks (SEP-2663, ``io.modelcontextprotocol/tasks``) as an SDK extension over a task backend.

``TasksExtension`` and ``serve_task_notifications`` speak the wire; a ``TaskBackend`` runs and
stores the tasks. See docs/mcp-server.md, "Two protocol eras, and MCP Tasks".
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
