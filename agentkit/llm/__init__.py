"""Model clients behind one ``LLM`` protocol: OpenAI-compatible HTTP, in-process GGUF, scripted."""

from agentkit.llm.base import (
    LLM,
    ChatRequest,
    LLMError,
    LLMResponse,
    LLMWrapper,
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
from agentkit.llm.scripted import ScriptedLLM, call, calls

__all__ = [
    "LLM",
    "ChatRequest",
    "LLMError",
    "LLMResponse",
    "LLMWrapper",
    "LocalGGUF",
    "Message",
    "OpenAICompatible",
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
