"""A small, real OpenAI-compatible Chat Completions server for tests.

It speaks the real wire format over real HTTP (JSON bodies, ``stream=true`` as Server-Sent
Events with ``chat.completion.chunk`` objects and a final usage chunk, ``tool_calls``, ``usage``),
so clients are tested exactly as they talk to OpenAI, vLLM or llama.cpp.

Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``.

Ways to run it
--------------
In-process (a uvicorn server on a background thread, on a free port)::

    with FakeOpenAIServer() as server:          # rule mode
        llm = OpenAICompatible(base_url=server.base_url, model="fake")
        server.fake.script("final answer", tool_call("add", a=1, b=2))   # scripted replies first

As a separate process (for end-to-end tests where a worker process calls the model)::

    python -m tests.support.fake_openai --port 8765 [--host 127.0.0.1] [--fail-first 2 --fail-status 429]
    # base_url is http://127.0.0.1:8765/v1 ; or from a test:
    with spawn_fake_openai() as base_url: ...

Scripted mode
-------------
``fake.script(*replies)`` queues replies, served one per request before the rules apply:

* a ``str``: a final answer with that content;
* ``{"content": ..., "tool_calls": [{"name": ..., "arguments": {...}, "id": optional}]}``;
* ``{"status": 429 | 500 | ..., "retry_after": optional seconds, "message": optional}``: an HTTP error;
* ``{"raw": text, "content_type": optional (default "text/html")}``: HTTP 200 with that body as
  is, streamed or not (a wrong ``base_url``, a proxy's login page);
* ``{"sse": [data, ...]}``: HTTP 200 ``text/event-stream`` with one ``data: <data>`` event per
  item as is, then ``data: [DONE]`` (malformed chunks).

Any scripted dict may carry ``"delay": seconds`` to answer late (for client timeouts).

``FakeOpenAI(mode="scripted")`` answers HTTP 400 once the queue is empty instead of using the rules.
``fake.requests`` holds every request body received, for assertions; ``fake.raw_requests`` holds
each request exactly as it arrived (headers with duplicates, raw body bytes), for asserting what a
client sends and what it must not.

Rule mode (the default; stateless and deterministic, so it works across processes)
---------------------------------------------------------------------------------
The *goal* is the content of the first ``user`` message. Tools are those offered in ``tools``.

1. If the last message is a ``tool`` message: answer ``"done: " + <that tool message's content>``.
2. If the last message is a ``user`` message:

   a. if the goal contains ``sleep N`` (N a number) and a tool whose name ends in ``sleep`` is
      offered, and no tool has been called yet in the conversation: call it with ``{"seconds": N}``;
   b. else if a tool whose name ends in ``echo`` is offered (for example ``example__echo`` or
      ``testing__echo``): call it with ``{"text": <the goal text after the word "echo ", or the
      whole goal if it has no "echo ">}``;
   c. else answer the goal text reversed.

   (After a ``sleep`` result, rule 1 applies: the answer is ``"done: <sleep result>"``.)
3. ``tool_choice: "none"`` or no tools: rule 2c (the goal reversed) unless rule 1 applies.

Usage is ``prompt_tokens`` = characters of all messages / 4 and ``completion_tokens`` = characters
of the reply / 4 (rounded up, at least 1).

Failures
--------
``fake.fail_next(status, times=1, retry_after=None)`` makes the next ``times`` requests fail
(429/500/503...), which is how retry/backoff is tested; ``--fail-first N --fail-status S`` does
the same from the command line.

Quirks of local servers (to test clients against them), ``FakeOpenAI(quirks={...})``:

* ``"empty_ids"``: tool calls carry ``"id": ""``;
* ``"random_chunk_ids"``: when streaming, every tool-call chunk carries a new random id;
* ``"text_tool_calls"``: tool calls are written into ``content`` as
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` instead of ``tool_calls``.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.servers.harness import free_port

Reply = dict[str, Any]


@dataclass(frozen=True)
class RawRequest:
    """A request as it arrived: every header (lower-case names, duplicates kept) and the body."""

    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        """Every value of header ``name``."""
        return [v for k, v in self.headers if k == name.lower()]

    def contains(self, text: str) -> bool:
        """Whether ``text`` appears anywhere in a header name or value or in the body."""
        return any(text in k or text in v for k, v in self.headers) or text.encode() in self.body


def tool_call(name: str, /, **arguments: Any) -> Reply:
    """A scripted reply that calls one tool."""
    return {"content": None, "tool_calls": [{"name": name, "arguments": arguments}]}


def _tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def rule_reply(body: dict[str, Any]) -> Reply:
    """The deterministic reply of rule mode (see the module docstring)."""
    messages: list[dict[str, Any]] = body.get("messages") or []
    tools = [] if body.get("tool_choice") == "none" else (body.get("tools") or [])
    names = [t.get("function", {}).get("name", "") for t in tools]
    goal = next((_text(m.get("content")) for m in messages if m.get("role") == "user"), "")
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        return {"content": "done: " + _text(last.get("content"))}
    called_before = any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
    sleep = re.search(r"sleep\s+(\d+(?:\.\d+)?)", goal)
    sleeper = next((n for n in names if n.endswith("sleep")), None)
    if last.get("role") == "user" and sleep and sleeper and not called_before:
        seconds: float | int = float(sleep.group(1))
        seconds = int(seconds) if float(seconds).is_integer() else seconds
        return tool_call(sleeper, seconds=seconds)
    echo = next((n for n in names if n.endswith("echo")), None)
    if last.get("role") == "user" and echo:
        _, found, after = goal.partition("echo ")
        return tool_call(echo, text=after if found else goal)
    return {"content": goal[::-1]}


class FakeOpenAI:
    """The server's state and its Starlette app (``fake.app``)."""

    def __init__(
        self,
        *,
        mode: Literal["rules", "scripted"] = "rules",
        model: str = "fake-model",
        quirks: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        self.mode = mode
        self.model = model
        self.quirks = set(quirks)
        self.queue: collections.deque[Reply | str] = collections.deque()
        self.requests: list[dict[str, Any]] = []
        self.raw_requests: list[RawRequest] = []
        self._lock = threading.Lock()
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/health", self._health, methods=["GET"]),
            ]
        )

    def script(self, *replies: Reply | str) -> FakeOpenAI:
        with self._lock:
            self.queue.extend(replies)
        return self

    def fail_next(self, status: int, times: int = 1, retry_after: float | None = None) -> FakeOpenAI:
        with self._lock:
            for _ in range(times):
                self.queue.appendleft({"status": status, "retry_after": retry_after})
        return self

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _models(self, request: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "fake"}]}
        )

    def _next(self, body: dict[str, Any]) -> Reply | None:
        with self._lock:
            if self.queue:
                item = self.queue.popleft()
                return {"content": item} if isinstance(item, str) else item
        if self.mode == "scripted":
            return None
        return rule_reply(body)

    async def _chat(self, request: Request) -> Response:
        raw = await request.body()
        self.raw_requests.append(RawRequest(headers=list(request.headers.items()), body=raw))
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "'messages' is required")
        self.requests.append(body)
        reply = self._next(body)
        if reply is None:
            return _error(400, "fake_openai: the script is empty (scripted mode); script more replies")
        if reply.get("delay"):
            await anyio.sleep(float(reply["delay"]))
        if "status" in reply:
            headers = (
                {"retry-after": str(reply["retry_after"])} if reply.get("retry_after") is not None else {}
            )
            return _error(
                int(reply["status"]), reply.get("message") or "fake_openai: scripted failure", headers
            )
        if "raw" in reply:
            return Response(str(reply["raw"]), media_type=reply.get("content_type", "text/html"))
        if "sse" in reply:
            events = "".join(f"data: {item}\n\n" for item in reply["sse"]) + "data: [DONE]\n\n"
            return Response(events, media_type="text/event-stream")
        calls: list[dict[str, Any]] = [
            {
                "id": "" if "empty_ids" in self.quirks else (c.get("id") or f"call_{uuid.uuid4().hex[:12]}"),
                "type": "function",
                "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}))},
            }
            for c in reply.get("tool_calls") or []
        ]
        content = reply.get("content")
        if calls and "text_tool_calls" in self.quirks:
            content = "".join(
                f'<tool_call>{{"name": "{c["function"]["name"]}", "arguments": {c["function"]["arguments"]}}}</tool_call>'
                for c in calls
            )
            calls = []
        prompt_tokens = _tokens("".join(_text(m.get("content")) for m in body["messages"]))
        completion_tokens = _tokens((content or "") + "".join(c["function"]["arguments"] for c in calls))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        finish = "tool_calls" if calls else "stop"
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                self._chunks(completion_id, content, calls, finish, usage if include_usage else None),
                media_type="text/event-stream",
            )
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                "usage": usage,
            }
        )

    async def _chunks(
        self,
        completion_id: str,
        content: str | None,
        calls: list[dict[str, Any]],
        finish: str,
        usage: dict[str, int] | None,
    ) -> AsyncIterator[str]:
        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
            data = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
            }
            return f"data: {json.dumps(data)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        text = content or ""
        for start in range(0, len(text), 8):
            yield chunk({"content": text[start : start + 8]})
        for index, call in enumerate(calls):
            arguments = call["function"]["arguments"]
            half = len(arguments) // 2
            first_id = call["id"]
            for n, piece in enumerate((arguments[:half], arguments[half:])):
                part: dict[str, Any] = {"index": index, "function": {"arguments": piece}}
                if n == 0:
                    part.update(id=first_id, type="function")
                    part["function"]["name"] = call["function"]["name"]
                elif "random_chunk_ids" in self.quirks:
                    part["id"] = f"call_{uuid.uuid4().hex[:12]}"
                yield chunk({"tool_calls": [part]})
        yield chunk({}, finish)
        if usage is not None:
            data = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": self.model,
                "choices": [],
                "usage": usage,
            }
            yield f"data: {json.dumps(data)}\n\n"
        yield "data: [DONE]\n\n"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = {429: "rate_limit_error", 400: "invalid_request_error"}.get(status, "server_error")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": None}},
        status_code=status,
        headers=headers,
    )


class FakeOpenAIServer:
    """Runs a ``FakeOpenAI`` under uvicorn on a background thread; a context manager.

    The socket is bound before the thread starts, so ``base_url`` is valid on ``__enter__``.
    """

    def __init__(self, fake: FakeOpenAI | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.fake = fake or FakeOpenAI()
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.fake.app, log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake OpenAI server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True  # do not wait for requests a test abandoned (delays)
        if self._thread is not None:
            self._thread.join(timeout=10)


def wait_for_http(
    proc: subprocess.Popen[bytes],
    url: str,
    *,
    deadline_s: float,
    why: Callable[[], str],
    poll_s: float = 0.05,
) -> None:
    """Poll ``url`` until it answers 200; ``RuntimeError(why())`` if ``proc`` exits first or the
    deadline passes (it only turns a hang into a failure: nothing is timed)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(why())
        time.sleep(poll_s)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    """Terminate ``proc``; kill it if it has not exited ``timeout_s`` later."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def spawn_python_server(
    module: str, *args: str, port: int, what: str, deadline_s: float = 20
) -> Iterator[None]:
    """Run ``python -m module --port port *args`` until the block ends; ready once its
    ``/health`` answers 200 (``RuntimeError`` naming ``what`` and its stderr if it never does)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def why() -> str:
        err = proc.stderr.read().decode() if proc.stderr and proc.poll() is not None else ""
        return f"the {what} process did not start: {err}"

    try:
        wait_for_http(proc, f"http://127.0.0.1:{port}/health", deadline_s=deadline_s, why=why)
        yield
    finally:
        stop_process(proc)
        if proc.stderr:
            proc.stderr.close()


@contextmanager
def spawn_fake_openai(*args: str, port: int | None = None) -> Iterator[str]:
    """Run ``python -m tests.support.fake_openai`` as a subprocess; yields its base_url."""
    port = port or free_port()
    with spawn_python_server("tests.support.fake_openai", *args, port=port, what="fake OpenAI server"):
        yield f"http://127.0.0.1:{port}/v1"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake OpenAI-compatible server (rule mode) for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--fail-first", type=int, default=0, help="fail the first N requests")
    parser.add_argument("--fail-status", type=int, default=500)
    parser.add_argument(
        "--quirk", action="append", default=[], help="empty_ids | random_chunk_ids | text_tool_calls"
    )
    args = parser.parse_args(argv)
    fake = FakeOpenAI(model=args.model, quirks=set(args.quirk))
    if args.fail_first:
        fake.fail_next(args.fail_status, times=args.fail_first)
    print(f"fake OpenAI server on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(fake.app, host=args.host, port=args.port, log_level="warning", lifespan="off")


if __name__ == "__main__":
    main()
