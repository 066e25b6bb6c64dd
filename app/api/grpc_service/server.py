"""The gRPC server beside HTTP: started and stopped with the app, on the same event loop and services."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from app.api.deps import Services
from app.api.grpc_service.servicer import InferenceServicer

log = logging.getLogger(__name__)

# Past the request limit grpc itself answers RESOURCE_EXHAUSTED before a byte reaches us; answers may be large.
_UNLIMITED = -1


async def start(services: Services, server_version: str, is_ready: Callable[[], bool],
                share_port: bool) -> grpc.aio.Server:
    """Serve `inference.GRPCInferenceService` on SLIMSERVE_GRPC_PORT. `share_port`: several server processes
    (`--workers N`) bind the same port with SO_REUSEPORT and the kernel spreads connections among them;
    a single process binds it alone, so that a port already taken fails the start instead of being shared."""
    settings = services.settings
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.max_send_message_length", _UNLIMITED),
        ("grpc.so_reuseport", 1 if share_port else 0),
        # Clients that keep a connection idle for minutes (load balancers, pools) are not dropped.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ])
    servicer = InferenceServicer(inference=services.inference, auth=services.auth, server_version=server_version,
                                 is_ready=is_ready, public_health=settings.public_health,
                                 generation_service=services.generation)
    server.add_generic_rpc_handlers((servicer.handler(),))
    address = f"{settings.host}:{settings.grpc_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(f"gRPC cannot listen on {address} (SLIMSERVE_GRPC_PORT; 0 turns gRPC off): {exc}") \
            from exc
    await server.start()
    log.info("gRPC (Open Inference Protocol) listening on %s", address)
    return server


async def stop(server: grpc.aio.Server, grace_seconds: float = 5.0) -> None:
    """Calls in flight get `grace_seconds` to finish; new ones are refused meanwhile."""
    await server.stop(grace_seconds)
