"""KServe's python ModelServer with its gRPC server on, for benchmarks/grpc.py; run by the kserve virtualenv of
../shared/peers/setup_venvs.sh (not SlimServe's). The model is the peers' onnxruntime MLP, as in
shared/peers/kserve_server.py (which turns gRPC off).

KServe binds gRPC to "[::]:port" and uvicorn to 0.0.0.0; both are moved to 127.0.0.1 here, so that the
benchmark listens on loopback only. Everything else is ModelServer's default.
"""

import argparse
import os
import sys
import uuid

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--name", default="mlp")
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--grpc-port", type=int, required=True)
args = parser.parse_args()
sys.argv = sys.argv[:1]  # kserve parses sys.argv at import time

import uvicorn  # noqa: E402
from grpc import aio  # noqa: E402

_Config = uvicorn.Config


class _LoopbackConfig(_Config):
    def __init__(self, *a, **kw):
        kw["host"] = "127.0.0.1"
        super().__init__(*a, **kw)


uvicorn.Config = _LoopbackConfig
_server = aio.server


def _loopback_server(*a, **kw):
    server = _server(*a, **kw)
    bind = server.add_insecure_port
    server.add_insecure_port = lambda address: bind(address.replace("[::]", "127.0.0.1"))
    return server


aio.server = _loopback_server

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer  # noqa: E402


class OnnxMLP(Model):
    def __init__(self, name, path):
        super().__init__(name)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("ORT_THREADS", "1"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.ready = True

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
        outputs = []
        for name, y in zip(self.output_names, self.session.run(None, {self.input_name: x}), strict=True):
            output = InferOutput(name=name, shape=list(y.shape), datatype="FP32")
            output.set_data_from_numpy(y, binary_data=False)
            outputs.append(output)
        return InferResponse(model_name=self.name, infer_outputs=outputs, response_id=payload.id or str(uuid.uuid4()))


if __name__ == "__main__":
    ModelServer(http_port=args.port, grpc_port=args.grpc_port, enable_grpc=True, workers=1).start(
        [OnnxMLP(args.name, args.model)])
