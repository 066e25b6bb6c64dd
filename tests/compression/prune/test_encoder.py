"""Transformer pruning on what real exporters write: heads, FFN neurons and blocks really leave the graph, and the
pruned model computes exactly what the original computes without them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from app.compression import graph
from app.compression.config import DistillStep, PruneStep, parse_recipe
from app.compression.context import StepContext
from app.compression.data import ModelData, from_npz
from app.compression.distill import run as distill
from app.compression.errors import DataRequired, InvalidRecipe, UnsupportedModel
from app.compression.normalize import normalize
from app.compression.preflight import check, profile
from app.compression.prune import run as prune
from app.compression.prune.encoder import _refit
from app.compression.prune.surgery import Surgery
from app.compression.prune.transformer import Block, find_blocks, split_outputs
from tests.compression.prune.helpers import run_exposing as _run
from tests.exports import exporter_models
from tests.helpers import CNN, TRANSFORMER

PruneMode = Literal["unstructured", "structured", "heads", "ffn", "layers"]
# bert-sdpa: transformers' default attention, as torch.onnx writes scaled_dot_product_attention (a NaN guard after
# the Softmax, a shape-keeping Reshape before the merge)
EXPORTS = ["bert.torchscript", "bert.dynamo", "bert-sdpa.torchscript", "vit.torchscript", "vit.dynamo",
           "distilbert.torchscript", "roberta.torchscript"]


@pytest.fixture(scope="module")
def normalized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each export as every recipe sees it: after the normalize step."""
    folder, out = exporter_models(), tmp_path_factory.mktemp("normalized")
    paths = {}
    for name in [*EXPORTS, "bert.ort-optimized", "deberta-v2.torchscript", "mpnet.torchscript"]:
        paths[name] = out / f"{name}.onnx"
        normalize(folder / f"{name}.onnx", paths[name], None)
    return paths


def _data(name: str, model: Path) -> ModelData:
    return from_npz(exporter_models() / f"{name}.samples.npz", graph.io_info(model)[0])


def _blocks(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[Block]:
    names = split_outputs(model)
    values = _run(model, feeds, names)
    return find_blocks(model, {n: values[n].shape for n in names})


def _zero_rows(model: onnx.ModelProto, weight: str, rows: np.ndarray) -> None:
    tensor = next(t for t in model.graph.initializer if t.name == weight)
    array = numpy_helper.to_array(tensor).copy()
    array[rows] = 0
    tensor.CopyFrom(numpy_helper.from_array(array, weight))


@pytest.mark.parametrize("name", EXPORTS)
def test_blocks_heads_and_ffn_are_found_in_real_exports(name: str, normalized: dict[str, Path]) -> None:
    model = onnx.load(normalized[name])
    feeds = {k: v[:2] for k, v in _data(name, normalized[name]).inputs.items()}
    blocks = _blocks(model, feeds)
    assert len(blocks) == 2  # models/build_exports.py: 2 layers, 4 heads of 8, FFN 64
    for block in blocks:
        assert (block.attention.heads, block.attention.head_dim) == (4, 8)
        assert block.ffn is not None
    assert blocks[0].end == blocks[1].start
    if name.startswith("vit"):  # pre-LN: the final LayerNorm reads the last block's end, and is not the block's
        final = [n for n in model.graph.node if blocks[1].end in n.input]
        assert [n.op_type for n in final] == ["LayerNormalization"]
        assert final[0].output[0] == "last_hidden_state"
    else:
        assert blocks[1].end == "last_hidden_state"


@pytest.mark.parametrize("name", EXPORTS)
def test_removing_heads_and_neurons_equals_silencing_them(name: str, normalized: dict[str, Path]) -> None:
    """The pruned graph computes what the original computes with those heads' and neurons' rows set to zero."""
    model = onnx.load(normalized[name])
    feeds = {k: v[:4] for k, v in _data(name, normalized[name]).inputs.items()}
    blocks = _blocks(model, feeds)
    attention, ffn = blocks[0].attention, blocks[1].ffn
    assert ffn is not None
    kept_heads, kept_neurons = [0, 3], np.arange(1, 64, 2)
    silenced = onnx.ModelProto()
    silenced.CopyFrom(model)
    _zero_rows(silenced, attention.out.weight, np.r_[8:24])  # heads 1 and 2
    _zero_rows(silenced, ffn.down.weight, np.arange(0, 64, 2))
    surgery = Surgery(model)
    surgery.keep_heads(attention, kept_heads)
    surgery.keep_neurons(ffn, kept_neurons)
    pruned = surgery.finish()
    onnx.checker.check_model(pruned, full_check=True)
    want, got = _run(silenced, feeds), _run(pruned, feeds)
    np.testing.assert_allclose(got["last_hidden_state"], want["last_hidden_state"], atol=2e-5)
    shapes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    assert shapes[attention.query.weight] == (32, 16)  # two heads of 8 columns left
    assert shapes[attention.out.weight] == (16, 32)
    assert shapes[ffn.up.weight] == (32, 32)
    assert graph.count_parameters(pruned)[0] < graph.count_parameters(silenced)[0]  # surgery edits in place


@pytest.mark.parametrize("name", ["vit.torchscript", "vit.dynamo"])
def test_dropping_a_pre_ln_block_equals_an_identity_block(name: str, normalized: dict[str, Path]) -> None:
    """Pre-LN: a block whose attention and FFN add nothing passes the stream on, which is what dropping it does;
    the final LayerNorm after the last block is not the block's and stays."""
    model = onnx.load(normalized[name])
    feeds = {k: v[:4] for k, v in _data(name, normalized[name]).inputs.items()}
    blocks = _blocks(model, feeds)
    silenced = onnx.ModelProto()
    silenced.CopyFrom(model)
    block = blocks[1]
    assert block.ffn is not None
    for projection in (block.attention.out, block.ffn.down):
        assert projection.bias is not None
        _zero_rows(silenced, projection.weight, np.arange(32 if projection is block.attention.out else 64))
        _zero_rows(silenced, projection.bias, np.arange(32))
    surgery = Surgery(model)
    surgery.drop_blocks(blocks, [1])
    pruned = surgery.finish()
    assert sum(n.op_type == "Softmax" for n in pruned.graph.node) == 1
    assert any(n.op_type == "LayerNormalization" for n in pruned.graph.node)
    np.testing.assert_allclose(_run(pruned, feeds)["last_hidden_state"],
                               _run(silenced, feeds)["last_hidden_state"], atol=2e-5)


@pytest.mark.parametrize("name", ["bert.torchscript", "bert.dynamo", "distilbert.torchscript"])
def test_dropping_a_post_ln_block_passes_the_stream_on(name: str, normalized: dict[str, Path]) -> None:
    model = onnx.load(normalized[name])
    feeds = {k: v[:4] for k, v in _data(name, normalized[name]).inputs.items()}
    blocks = _blocks(model, feeds)
    stream = _run(model, feeds, [blocks[0].end])[blocks[0].end]
    surgery = Surgery(model)
    surgery.drop_blocks(blocks, [1])
    pruned = surgery.finish()
    np.testing.assert_allclose(_run(pruned, feeds)["last_hidden_state"], stream, atol=1e-6)
    assert sum(n.op_type == "Softmax" for n in pruned.graph.node) == 1


def test_least_squares_repair_reproduces_the_full_layer_when_inputs_are_redundant() -> None:
    """Removed inputs that are linear in the kept ones lose nothing once the kept rows are refit."""
    rng = np.random.default_rng(0)
    kept_inputs = rng.normal(size=(500, 6))
    inputs = np.concatenate([kept_inputs, kept_inputs[:, :2] @ rng.normal(size=(2, 2))], axis=1)
    weight = rng.normal(size=(8, 5)).astype(np.float32)
    gram = inputs.T @ inputs / len(inputs)
    refit = _refit(gram, weight, np.arange(6))
    np.testing.assert_allclose(kept_inputs @ refit, inputs @ weight, rtol=1e-3, atol=1e-3)
    plain = np.abs(kept_inputs @ weight[:6] - inputs @ weight).mean()
    assert np.abs(kept_inputs @ refit - inputs @ weight).mean() < plain / 100
    independent = rng.normal(size=(500, 8))
    np.testing.assert_allclose(_refit(independent.T @ independent / 500, weight, np.arange(8)), weight,
                               rtol=1e-3, atol=1e-3)  # nothing removed: nothing changes


@pytest.mark.parametrize(("mode", "sparsity"), [("heads", 0.5), ("ffn", 0.5), ("layers", 0.5),
                                                ("structured", 0.5)])
def test_each_mode_shrinks_a_real_bert_export(mode: PruneMode, sparsity: float, normalized: dict[str, Path],
                                              make_ctx: Callable[..., StepContext], tmp_path: Path) -> None:
    model = normalized["bert.torchscript"]
    output = tmp_path / "pruned.onnx"
    notes = prune(model, output, PruneStep(mode=mode, sparsity=sparsity),
                  make_ctx(model, train=_data("bert.torchscript", model)))
    assert notes["importance"] == "activation"
    assert notes["parameters_after"] < notes["parameters_before"]
    pruned = onnx.load(output)
    softmaxes = sum(n.op_type == "Softmax" for n in pruned.graph.node)
    if mode == "heads":
        assert notes["heads_kept"] == [2, 2] and softmaxes == 2
    if mode == "ffn":
        assert notes["ffn_kept"] == [32, 32]
    if mode == "layers":
        assert len(notes["blocks_dropped"]) == 1 and softmaxes == 1
        assert len(notes["block_costs"]) == 2
    if mode == "structured":  # every plan measured, the most faithful kept
        assert {p["plan"] for p in notes["plans"]} >= {"heads+ffn", "layers"}
        best = max(p["fidelity_before_recovery"] for p in notes["plans"])
        assert next(p for p in notes["plans"] if p["plan"] == notes["plan"])["fidelity_before_recovery"] == best
    else:
        assert "fidelity_without_repair" in notes["plans"][0]
    data = _data("bert.torchscript", model)
    want = graph.session(model).run(None, next(data.batches(8)))[0]
    got = graph.session(output).run(None, next(data.batches(8)))[0]
    assert got.shape == want.shape


def test_distillation_matches_the_kept_blocks_hidden_states(normalized: dict[str, Path],
                                                           make_ctx: Callable[..., StepContext],
                                                           tmp_path: Path) -> None:
    """The teacher is the upload as the exporter wrote it (weights behind Identity nodes), the student comes from
    its normalized copy: their residual streams still match by name."""
    model, upload = normalized["bert.torchscript"], exporter_models() / "bert.torchscript.onnx"
    data = _data("bert.torchscript", model)
    pruned = tmp_path / "pruned.onnx"
    prune(model, pruned, PruneStep(mode="heads", sparsity=0.5), make_ctx(upload, train=data))
    notes = distill(pruned, tmp_path / "distilled.onnx", DistillStep(epochs=2, batch_size=16),
                    make_ctx(upload, train=data))
    teacher_blocks = find_blocks(onnx.load(model))
    assert notes["hidden_states"] == [teacher_blocks[0].end]  # the last block's end is the output itself
    assert notes["lr"] == 1e-4  # a transformer's default
    assert notes["epochs_run"] == 2


def test_attention_that_cannot_be_identified_is_named(normalized: dict[str, Path]) -> None:
    fused = onnx.load(normalized["bert.ort-optimized"])  # its Attention is pruned (test_packed_attention.py)
    next(n for n in fused.graph.node if n.op_type == "Attention").op_type = "GroupQueryAttention"
    with pytest.raises(UnsupportedModel, match="fused into GroupQueryAttention"):
        find_blocks(fused)
    with pytest.raises(UnsupportedModel, match="no Softmax"):
        find_blocks(onnx.load(CNN))
    with pytest.raises(UnsupportedModel, match="attention at"):
        find_blocks(onnx.load(normalized["deberta-v2.torchscript"]))
    mpnet = normalized["mpnet.torchscript"]
    feeds = {k: v[:2] for k, v in _data("mpnet.torchscript", mpnet).inputs.items()}
    with pytest.raises(UnsupportedModel, match="bias per head"):  # relative positions, seen once it runs
        _blocks(onnx.load(mpnet), feeds)


def test_structured_falls_back_to_channels_where_heads_cannot_be_cut(normalized: dict[str, Path],
                                                                   make_ctx: Callable[..., StepContext],
                                                                   tmp_path: Path) -> None:
    model = normalized["mpnet.torchscript"]
    notes = prune(model, tmp_path / "out.onnx", PruneStep(mode="structured", sparsity=0.5),
                  make_ctx(model, train=_data("mpnet.torchscript", model)))
    assert "bias per head" in notes["transformer_pruning"] and notes["importance"] == "l2"
    assert notes["parameters_after"] < notes["parameters_before"]


def test_bad_transformer_recipes_are_refused_at_submission(normalized: dict[str, Path]) -> None:
    bert = profile(exporter_models() / "bert.torchscript.onnx")
    assert bert["transformer"] == {"blocks": 2, "reason": None}
    heads = parse_recipe({"steps": [{"op": "prune", "mode": "heads", "sparsity": 0.5}]})
    assert check(bert, heads, has_dataset=True) == []
    assert "upload a dataset" in check(bert, heads, has_dataset=False)[0]
    assert "the dataset has 10 samples" in check(bert, heads, has_dataset=True, dataset_samples=10)[0]
    assert check(bert, heads, has_dataset=True, dataset_samples=11) == []
    few = parse_recipe({"steps": [{"op": "prune", "mode": "layers", "sparsity": 0.2}]})
    assert "drops none of the 2 blocks" in check(bert, few, has_dataset=True)[0]
    cnn = check(profile(CNN), heads, has_dataset=True)
    assert "needs a transformer whose attention can be identified" in cnn[0] and "no Softmax" in cnn[0]
    assert check(profile(TRANSFORMER), heads, has_dataset=True) == []  # packed QKV: found at upload too
    with pytest.raises(InvalidRecipe, match="sparsity"):
        parse_recipe({"steps": [{"op": "prune", "mode": "heads", "sparsity": 1.0}]})


def test_pruning_a_transformer_without_a_dataset_says_so(normalized: dict[str, Path],
                                                         make_ctx: Callable[..., StepContext],
                                                         tmp_path: Path) -> None:
    model = normalized["bert.torchscript"]
    with pytest.raises(DataRequired, match="upload a dataset"):
        prune(model, tmp_path / "out.onnx", PruneStep(mode="heads", sparsity=0.5), make_ctx(model, train=None))
    small = _data("bert.torchscript", model).take(4)
    with pytest.raises(DataRequired, match="at least 8"):
        prune(model, tmp_path / "out.onnx", PruneStep(mode="layers", sparsity=0.5), make_ctx(model, train=small))
