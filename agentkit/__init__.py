"""agentkit: a small, typed, async toolkit for LLM agents that call tools (MCP tools included).

It stands alone: ``pip install`` it and build an agent with any OpenAI-compatible server or a
local GGUF model, no queue or server needed.
"""

from agentkit.agent import Agent
from agentkit.approval import Approval, PendingApproval, denial_message
from agentkit.errors import AgentConfigError, AgentKitError, ToolDefinitionError, ToolError, ToolRegistryError
from agentkit.journal import (
    IDEMPOTENCY_META_KEY,
    INTERRUPTED_MESSAGE,
    ApprovalPolicy,
    Journal,
    JournalEntry,
    JournalError,
    MemoryJournal,
    RerunPolicy,
    current_call_key,
    rerun_if_idempotent,
)
from agentkit.llm import LLM, LLMError, LLMResponse, Message, ToolCall, Usage
from agentkit.mcp_proxy import (
    McpCaller,
    error_from_mcp,
    expand_server_tools,
    idempotent_from_annotations,
    mcp_proxy_tool,
    result_from_mcp,
)
from agentkit.memory import BufferMemory, Memory, SummaryMemory
from agentkit.planners import PlanAndExecutePlanner, Planner, ReActPlanner, RunContext, get_planner
from agentkit.progress import ProgressCallback, ToolProgress, report_progress
from agentkit.result import AgentEvent, RunResult, RunStatus, Step
from agentkit.tools import Tool, ToolRegistry, ToolResult, tool

__all__ = [
    "IDEMPOTENCY_META_KEY",
    "INTERRUPTED_MESSAGE",
    "LLM",
    "Agent",
    "AgentConfigError",
    "AgentEvent",
    "AgentKitError",
    "Approval",
    "ApprovalPolicy",
    "BufferMemory",
    "Journal",
    "JournalEntry",
    "JournalError",
    "LLMError",
    "LLMResponse",
    "McpCaller",
    "Memory",
    "MemoryJournal",
    "Message",
    "PendingApproval",
    "PlanAndExecutePlanner",
    "Planner",
    "ProgressCallback",
    "ReActPlanner",
    "RerunPolicy",
    "RunContext",
    "RunResult",
    "RunStatus",
    "Step",
    "SummaryMemory",
    "Tool",
    "ToolCall",
    "ToolDefinitionError",
    "ToolError",
    "ToolProgress",
    "ToolRegistry",
    "ToolRegistryError",
    "ToolResult",
    "Usage",
    "current_call_key",
    "denial_message",
    "error_from_mcp",
    "expand_server_tools",
    "get_planner",
    "idempotent_from_annotations",
    "mcp_proxy_tool",
    "report_progress",
    "rerun_if_idempotent",
    "result_from_mcp",
    "tool",
]
