"""Model clients behind one ``LLM`` protocol: OpenAI-compatible HTTP, in-process GGUF, scripted."""

from agentkit.llm.base import (
    LLM,
    LLMError,
    LLMResponse,
    Message,
    SharedLLM,
    TokenCounter,
    ToolCall,
    ToolChoice,
    ToolDefinition,
    Usage,
    estimate_tokens,
)
from agentkit.llm.local import LocalGGUF, default_model_path
from agentkit.llm.openai_compat import OpenAICompatible
from agentkit.llm.scripted import ScriptedCall, ScriptedLLM, call, calls

__all__ = [
    "LLM",
    "LLMError",
    "LLMResponse",
    "LocalGGUF",
    "Message",
    "OpenAICompatible",
    "ScriptedCall",
    "ScriptedLLM",
    "SharedLLM",
    "TokenCounter",
    "ToolCall",
    "ToolChoice",
    "ToolDefinition",
    "Usage",
    "call",
    "calls",
    "default_model_path",
    "estimate_tokens",
]
