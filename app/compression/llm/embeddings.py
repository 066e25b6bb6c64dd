"""A variant's 4-bit embedding table (GatherBlockQuantized) put back in float, with the original's own values, so
that `auto` can measure what quantizing the table costs instead of assuming it.

The original gathers either from its own [vocab, hidden] table or, with tied embeddings, from a Transpose of the
LM head's weight; either way the float table is read from the original folder, not from the variant (whose head
may be quantized).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

from app.compression.llm.forward import genai_config
from app.compression.llm.gptq import drop_unused_initializers
from app.compression.llm.quantize import save_folder


def with_float_table(variant: Path, original: Path, output: Path) -> bool:
    """`output`: the variant with its quantized embedding table replaced by the original's float one; False (and
    nothing written) when the variant has no quantized table."""
    found = _original_table(original)
    if found is None:
        return False
    gather, table = found
    model = onnx.load(str(variant / genai_config(variant)["model"]["decoder"]["filename"]))
    quantized = next((n for n in model.graph.node if n.op_type == "GatherBlockQuantized"
                      and n.output[0] == gather.output[0]), None)
    if quantized is None:
        return False
    replacement = onnx.NodeProto()
    replacement.CopyFrom(gather)
    replacement.input[0] = f"{gather.name}/float_table"
    replacement.input[1] = quantized.input[1]  # the token ids, as the variant computes them
    index = list(model.graph.node).index(quantized)
    model.graph.node.remove(quantized)
    model.graph.node.insert(index, replacement)
    model.graph.initializer.append(numpy_helper.from_array(table, replacement.input[0]))
    drop_unused_initializers(model)
    save_folder(model, variant, output)
    return True


def _original_table(original: Path) -> tuple[onnx.NodeProto, np.ndarray] | None:
    """The original's embedding Gather and its float [vocab, hidden] table (only that tensor is read)."""
    model = onnx.load(str(original / genai_config(original)["model"]["decoder"]["filename"]),
                      load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type != "Gather" or not node.input:
            continue
        source, transposed = node.input[0], False
        producer = producers.get(source)
        if producer is not None and producer.op_type == "Transpose":  # tied to the LM head's [hidden, vocab] weight
            source, transposed = producer.input[0], True
        tensor = initializers.get(source)
        if tensor is None or len(tensor.dims) != 2:
            continue
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(original))
        table = numpy_helper.to_array(tensor)
        return node, np.ascontiguousarray(table.T if transposed else table)
    return None
