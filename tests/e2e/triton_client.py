"""NVIDIA's tritonclient (its gevent HTTP client) against a SlimServe server, run as a script in its own process,
the way a user's client runs. gevent's hub and resolver threads thus never share the test process with torch,
onnxruntime and Playwright's greenlets.

    python -m tests.e2e.triton_client PORT MODEL ROWS.npy OUT.npz

OUT.npz holds every answer (`json-0`.. `binary-2`, `default`) and `facts`, a JSON text of what the server said
about itself and the model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.http as triton


def talk(port: int, model: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
    try:
        facts = {"live": client.is_server_live(), "ready": client.is_server_ready(),
                 "model_ready": client.is_model_ready(model), "metadata": client.get_model_metadata(model),
                 "ids": []}
        answers: dict[str, np.ndarray] = {}
        for binary in (False, True):
            for attempt in range(3):
                tensor = triton.InferInput("input", list(rows.shape), "FP32")
                tensor.set_data_from_numpy(rows, binary_data=binary)
                output = triton.InferRequestedOutput("logits", binary_data=binary)
                result = client.infer(model, [tensor], outputs=[output], request_id="abc")
                answers[f"{'binary' if binary else 'json'}-{attempt}"] = result.as_numpy("logits")
                facts["ids"].append(result.get_response()["id"])
        # No requested outputs: tritonclient asks for binary outputs by default.
        tensor = triton.InferInput("input", list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows, binary_data=False)
        answers["default"] = client.infer(model, [tensor]).as_numpy("logits")
    finally:
        client.close()
    return {**answers, "facts": np.array(json.dumps(facts))}


def main(argv: list[str]) -> int:
    port, model, rows, out = int(argv[0]), argv[1], np.load(argv[2]), Path(argv[3])
    np.savez(out, allow_pickle=False, **talk(port, model, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
