"""agentkit: a small, typed, async toolkit for LLM agents that call tools (MCP tools included).

It stands alone: ``pip install`` it and build an agent with any OpenAI-compatible server or a
local GGUF model, no queue or server needed.
"""

from agentkit.agent import Agent
from agentkit.errors import AgentConfigError, AgentKitError, ToolDefinitionError, ToolError, ToolRegistryError
from agentkit.llm import LLM, LLMError, LLMResponse, Message, ToolCall, Usage
from agentkit.mcp_proxy import McpCaller, expand_server_tools, mcp_proxy_tool, result_from_mcp
from agentkit.memory import BufferMemory, Memory, SummaryMemory
from agentkit.planners import PlanAndExecutePlanner, Planner, ReActPlanner, RunContext, get_planner
from agentkit.progress import ProgressCallback, ToolProgress, report_progress
from agentkit.result import AgentEvent, RunResult, RunStatus, Step
from agentkit.tools import Tool, ToolRegistry, ToolResult, tool

__all__ = [
    "LLM",
    "Agent",
    "AgentConfigError",
    "AgentEvent",
    "AgentKitError",
    "BufferMemory",
    "LLMError",
    "LLMResponse",
    "McpCaller",
    "Memory",
    "Message",
    "PlanAndExecutePlanner",
    "Planner",
    "ProgressCallback",
    "ReActPlanner",
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
    "expand_server_tools",
    "get_planner",
    "mcp_proxy_tool",
    "report_progress",
    "result_from_mcp",
    "tool",
]
