"""What the transformer-pruning tests share: running a graph with some of its intermediate tensors exposed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort


def run_exposing(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                 extra: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Every output by name, and the tensors named in `extra` as outputs too."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in extra)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
