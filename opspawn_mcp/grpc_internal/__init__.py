"""The gRPC door: ``opspawn.v1.TaskService`` (proto/tasks.proto) over the same ``TaskService``.

``gen/`` holds the code ``scripts/gen_proto.py`` generates; everything else here is hand-written.
"""

from __future__ import annotations

from opspawn_mcp.grpc_internal.server import GrpcServer, serve_grpc

__all__ = ["GrpcServer", "serve_grpc"]
