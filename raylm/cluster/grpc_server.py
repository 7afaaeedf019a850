"""raylm's own gRPC listener (`raylm.Generate`) inside each ingress replica.

Ray Serve's gRPC proxy binds every interface and has no TLS, so `raylm serve` does not
use it: each ingress replica runs a `grpc.aio` server on its event loop, bound to the
same host as HTTP, with SO_REUSEPORT so every replica on a node shares the port (as
`serve_directly` does for HTTP), optionally with TLS, and with the HTTP body limit as
its largest message.
"""
from __future__ import annotations

import asyncio
from typing import Optional

import grpc

from raylm.cluster import raylm_pb2_grpc as pb_grpc
from raylm.cluster.limits import DEFAULT_MAX_REQUEST_BODY_BYTES


def grpc_address(host: str, port: int) -> str:
    """host:port, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def serve_grpc(servicer, host: str, port: int, ssl_keyfile: Optional[str] = None,
               ssl_certfile: Optional[str] = None,
               max_message_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES) -> grpc.aio.Server:
    """A grpc.aio server for `servicer` (a `GrpcGenerateMixin`) on host:port, on the
    running event loop. The port is bound here, so a bad host, a busy port or an
    unreadable key raises now; the server starts as a task. TLS when both files are
    given; a larger message than max_message_bytes gets RESOURCE_EXHAUSTED."""
    if bool(ssl_keyfile) != bool(ssl_certfile):
        raise ValueError("TLS needs both ssl_keyfile and ssl_certfile, got "
                         f"ssl_keyfile={ssl_keyfile!r}, ssl_certfile={ssl_certfile!r}")
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1),
                                      ("grpc.max_receive_message_length", max_message_bytes)])
    pb_grpc.add_GenerateServicer_to_server(servicer, server)
    address = grpc_address(host, port)
    if ssl_certfile:
        creds = grpc.ssl_server_credentials([(_read(ssl_keyfile), _read(ssl_certfile))])
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise RuntimeError(f"gRPC could not bind {address}")
    asyncio.get_running_loop().create_task(server.start())
    return server
