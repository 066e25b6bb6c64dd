"""Weight-only INT4/INT8 of an onnxruntime-genai folder: its decoder's MatMuls become MatMulNBits.

The fp32 folder (the reference) is quantized with onnxruntime's MatMulNBits quantizer, so every algorithm it
has offline applies: RTN (round to nearest, per block), k-quant (llama.cpp's scale search), HQQ (half-quadratic
optimization of scales and zero points), and GPTQ (error-compensating, calibrated on text through the decoder
itself). Everything but the graph is copied: genai_config.json, the tokenizer, the chat template.
"""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from app.compression.errors import InvalidRecipe
from app.compression.llm import gptq
from app.compression.llm.forward import DecoderSession, genai_config

log = logging.getLogger(__name__)

ALGORITHMS = ("rtn", "k_quant", "gptq", "hqq", "gptq_inc")
GPTQ_SEQUENCES = 32
GPTQ_TOKENS = 256


def lm_head(model: onnx.ModelProto) -> str | None:
    """The MatMul that writes the logits (the builder names it /lm_head/MatMul)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get(model.graph.output[0].name)
    while node is not None and node.op_type != "MatMul":
        node = producers.get(node.input[0]) if node.input else None
    return node.name if node is not None else None


@dataclass
class QuantizedBody:
    """The decoder with every MatMul but the LM head quantized; the head is given its precision per variant."""

    model: onnx.ModelProto
    head: str | None
    bits: int
    algorithm: str
    block_size: int
    hessians: dict[str, np.ndarray] | None = None
    """GPTQ's Hessians of the decoder's MatMul inputs: the head is quantized by GPTQ too, and another body of
    the same model (edge blocks at INT8) needs no second calibration."""
    edge_bits: int | None = None
    """The precision of the first and last decoder blocks where it differs from `bits`."""


def quantize_body(source: Path, *, bits: int, algorithm: str, block_size: int,
                  calibration: list[list[int]] | None, threads: int = 1, embeddings: bool = True,
                  edge_bits: int | None = None, scratch: Path | None = None,
                  hessians: dict[str, np.ndarray] | None = None,
                  check: Callable[[], None] | None = None) -> QuantizedBody:
    """Every MatMul but the LM head by `algorithm`; with `edge_bits`, those of the first and last decoder blocks at
    that precision instead (GPTQ for gptq, else round to nearest); at 4 bits and with `embeddings`, the embedding
    table (a Gather of a constant table) rounded to nearest in blocks of the same size."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if algorithm not in ALGORITHMS:
        raise InvalidRecipe(f"unknown algorithm '{algorithm}'; algorithms: {', '.join(ALGORITHMS)}")
    if algorithm.startswith("gptq") and not calibration:
        raise InvalidRecipe("gptq calibrates on text: the job needs a text dataset")
    if algorithm not in ("rtn", "gptq") and bits != 4:
        raise InvalidRecipe(f"{algorithm} quantizes to 4 bits in onnxruntime's quantizer; int8 uses rtn or gptq")
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # a line per node otherwise
    model = onnx.load(str(source / genai_config(source)["model"]["decoder"]["filename"]))
    if embeddings and bits == 4:
        _untie_embedding(model)
    head = lm_head(model)
    edges = edge_blocks(model) if edge_bits is not None else set()
    sums: dict[str, np.ndarray] = {}
    if algorithm == "gptq":
        assert calibration is not None
        sums = hessians or gptq.calibrate(model, source, calibration, threads=threads, scratch=scratch, check=check)
    hidden = [_hide_weight(model, name) for name in [head, *sorted(edges)] if name is not None]
    if algorithm == "gptq":
        gptq.quantize_model(model, sums, bits=bits, block_size=block_size, check=check)
        quantized = model
    else:
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                         op_types_to_quantize=("MatMul",),
                                         algo_config=_algorithm(algorithm, bits, block_size, source, calibration,
                                                                threads))
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            # An all-zero block has scale 0 (stored as 0); HQQ hands torch a read-only view it never writes to.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            quantizer.process()
        quantized = quantizer.model.model
    if edges:
        for name in hidden[1 if head is not None else 0:]:
            _restore_weight(quantized, name)
        quantized = _requantize(quantized, edges, edge_bits or bits, block_size, sums)
    if embeddings and bits == 4:  # onnxruntime's GatherBlockQuantized takes 4-bit tables only
        tables = MatMulNBitsQuantizer(quantized, bits=bits, block_size=block_size, is_symmetric=True,
                                      op_types_to_quantize=("Gather",))
        with np.errstate(divide="ignore", invalid="ignore"):
            tables.process()
        quantized = tables.model.model
    if head is not None:
        _restore_weight(quantized, hidden[0])
    return QuantizedBody(quantized, head, bits, algorithm, block_size, sums or None,
                         edge_bits=edge_bits if edges else None)


def edge_blocks(model: onnx.ModelProto) -> set[str]:
    """The weighted MatMuls of the first and the last decoder block (the builder names them /model/layers.N/...);
    none for a model of fewer than three blocks, where they would be the whole body."""
    layers: dict[int, list[str]] = {}
    for node in gptq.weighted_matmuls(model):
        found = re.search(r"/layers\.(\d+)/", node.name)
        if found:
            layers.setdefault(int(found.group(1)), []).append(node.name)
    if len(layers) < 3:
        return set()
    return {*layers[min(layers)], *layers[max(layers)]}


def _requantize(model: onnx.ModelProto, names: set[str], bits: int, block_size: int,
                sums: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The named MatMuls at `bits`: by GPTQ when there are Hessians, else rounded to nearest."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if sums:
        gptq.quantize_model(model, sums, bits=bits, block_size=block_size, only=names)
        return model
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     nodes_to_include=sorted(names), op_types_to_quantize=("MatMul",))
    with np.errstate(divide="ignore", invalid="ignore"):
        quantizer.process()
    result: onnx.ModelProto = quantizer.model.model
    return result


def write_variant(body: QuantizedBody, source: Path, output: Path, *, head_bits: int | None) -> dict[str, Any]:
    """The folder of `body` with its LM head rounded to `head_bits` (None: float); returns the notes."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.ModelProto()
    model.CopyFrom(body.model)
    if body.head is not None and head_bits is not None and body.hessians is not None:
        gptq.quantize_model(model, body.hessians, bits=head_bits, block_size=body.block_size, only={body.head})
    elif body.head is not None and head_bits is not None:
        head_quantizer = MatMulNBitsQuantizer(model, bits=head_bits, block_size=body.block_size, is_symmetric=True,
                                              nodes_to_include=[body.head], op_types_to_quantize=("MatMul",))
        head_quantizer.process()
        model = head_quantizer.model.model
    save_folder(model, source, output)
    return describe(model, body, head_bits)


def save_folder(model: onnx.ModelProto, source: Path, output: Path) -> None:
    """`model` as the decoder of `output`, beside a copy of every other file of `source` (config, tokenizer)."""
    filename = genai_config(source)["model"]["decoder"]["filename"]
    output.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name not in (filename, f"{filename}.data", "MANIFEST.json"):
            shutil.copy2(path, output / path.name)
    onnx.save(model, str(output / filename), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{filename}.data", size_threshold=1024)


def describe(model: onnx.ModelProto, body: QuantizedBody, head_bits: int | None) -> dict[str, Any]:
    """The notes of a variant: how many MatMuls at which precision, the head's, the table's, the edge blocks'."""
    weights = {t.name for t in model.graph.initializer}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kind = f"int{next((a.i for a in node.attribute if a.name == 'bits'), 4)}"
        elif node.op_type == "MatMul" and any(i in weights for i in node.input):
            kind = "float"
        else:
            continue
        counts[kind] = counts.get(kind, 0) + 1
    tables = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized" or (
        n.op_type == "Gather" and n.input and n.input[0] in weights)]
    embedding = "float" if not tables or tables[0].op_type == "Gather" else f"int{body.bits}"
    return {"bits": body.bits, "algorithm": body.algorithm, "block_size": body.block_size, "matmuls": counts,
            "lm_head": "float" if head_bits is None else f"int{head_bits}", "embeddings": embedding,
            "edge_blocks": f"int{body.edge_bits or body.bits}"}


def _untie_embedding(model: onnx.ModelProto) -> None:
    """Tied embeddings: the builder gathers from a Transpose of the LM head's weight, so neither can be quantized
    as a table. Give the Gather its own [vocab, hidden] table (the head's weight, transposed once, here)."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        source = producers.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if source is None or source.op_type != "Transpose" or source.input[0] not in initializers:
            continue
        table = numpy_helper.from_array(numpy_helper.to_array(initializers[source.input[0]]).T.copy(),
                                        f"{node.name}/table")
        model.graph.initializer.append(table)
        node.input[0] = table.name
        if not any(source.output[0] in other.input for other in model.graph.node):
            model.graph.node.remove(source)
        return


def _hide_weight(model: onnx.ModelProto, node_name: str) -> str:
    """Turn the node's weight initializer into a Constant node, so that no quantizer algorithm sees a constant
    weight there (onnxruntime's GPTQ and k-quant paths ignore `nodes_to_exclude`); returns the weight's name."""
    node = next(n for n in model.graph.node if n.name == node_name)
    weight = next(t for t in model.graph.initializer if t.name == node.input[1])
    model.graph.initializer.remove(weight)
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], [weight.name], name=f"{weight.name}/hidden",
                                                     value=weight))
    return str(weight.name)


def _restore_weight(model: onnx.ModelProto, name: str) -> None:
    constant = next(n for n in model.graph.node if n.op_type == "Constant" and n.output[0] == name)
    tensor = onnx.TensorProto()
    tensor.CopyFrom(constant.attribute[0].t)
    tensor.name = name
    model.graph.node.remove(constant)
    model.graph.initializer.append(tensor)


def set_accuracy_level(folder: Path, level: int) -> None:
    """MatMulNBits' compute type on every node of the folder's decoder (1: float32, 4: int8 activations)."""
    path = folder / genai_config(folder)["model"]["decoder"]["filename"]
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])
    onnx.save(model, str(path))  # the graph only: its external data file stays as it is


def _algorithm(name: str, bits: int, block_size: int, source: Path, calibration: list[list[int]] | None,
               threads: int) -> Any:
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    if name == "rtn":
        return nbits.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=bits,
                                                  op_types_to_quantize=("MatMul",))
    if name == "k_quant":
        return nbits.KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",))  # the quantizer's block size
    if name == "hqq":
        return nbits.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4, op_types_to_quantize=("MatMul",))
    assert calibration is not None
    return nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Calibration(source, calibration, threads),
                                           block_size=block_size, percdamp=0.01, actorder=False,
                                           op_types_to_quantize=("MatMul",))


class _Calibration:
    """GPTQ's calibration inputs: the dataset's token sequences as the decoder takes them (an empty past).
    Plain arrays only: the quantizer deep-copies its reader."""

    def __init__(self, source: Path, sequences: list[list[int]], threads: int) -> None:
        decoder = DecoderSession(source, threads=threads)
        self._feeds = [decoder.feeds(ids[:GPTQ_TOKENS]) for ids in sequences[:GPTQ_SEQUENCES] if len(ids) > 1]
        self._next = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        self._next += 1
        return self._feeds[self._next - 1] if self._next <= len(self._feeds) else None

    def rewind(self) -> None:
        self._next = 0
