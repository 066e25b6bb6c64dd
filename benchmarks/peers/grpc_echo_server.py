"""The ceiling of Python gRPC on one core, for benchmarks/grpc.py: a grpc.aio server whose ModelInfer returns one
pre-serialized answer without reading the request (no protobuf parsing, no model, no checks). No server written
on grpcio can answer faster than this on the same core; the peers and SlimServe are measured against it.

Usage: python grpc_echo_server.py --port PORT --answer FILE (a serialized ModelInferResponse)
"""

import argparse
import asyncio
from pathlib import Path

import grpc

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--answer", type=Path, required=True)
args = parser.parse_args()
ANSWER = args.answer.read_bytes()


async def model_infer(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
    return ANSWER


async def main() -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)}),))  # bytes in, bytes out
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
