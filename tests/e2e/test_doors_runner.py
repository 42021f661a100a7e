"""``python -m tests.e2e.test_doors_runner --config F``: the serve process the doors suite runs.

It composes exactly what ``opspawn-mcp serve`` is meant to: the ``Runtime`` (store, pool,
embedded worker, ``TaskService``, MCP at /mcp and /sse), the REST gateway mounted beside MCP
at ``/``, and the gRPC door on ``opspawn.server.grpc_port``, all over one service. Once the
CLI's serve mounts the gateway and starts gRPC itself, the suite runs ``opspawn-mcp serve``
instead and this file goes away. It holds no tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

from starlette.routing import Mount

from gateway.app import create_gateway
from opspawn_mcp.app import Runtime, auth_token
from opspawn_mcp.config import load_config
from opspawn_mcp.grpc_internal import serve_grpc


async def serve(config_path: Path) -> None:
    config = load_config(config_path)
    settings = config.opspawn.server
    token = auth_token(config)
    async with Runtime(config) as runtime, contextlib.AsyncExitStack() as doors:
        if settings.grpc_port is not None:
            grpc_door = await doors.enter_async_context(
                serve_grpc(runtime.service, settings.host, settings.grpc_port, token)
            )
            print(f"opspawn: serving gRPC at {grpc_door.target}", file=sys.stderr, flush=True)
        gateway = create_gateway(runtime.service, token)
        await runtime.serve_http(extra_routes=[Mount("/", app=gateway)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.config))


if __name__ == "__main__":
    main()
