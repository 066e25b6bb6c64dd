"""Heads pruned where Q, K and V come out of one packed projection (torch.nn.TransformerEncoder through both of
torch.onnx's exporters, our own tiny transformer) or where onnxruntime fused the attention into one op: the
pruned graph computes exactly what the original computes with those heads silenced."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from app.compression import graph
from app.compression.config import PruneStep
from app.compression.context import StepContext
from app.compression.data import ModelData, from_npz
from app.compression.errors import UnsupportedModel
from app.compression.normalize import normalize
from app.compression.optimize.attention import fuse_attention
from app.compression.prune import run as prune
from app.compression.prune.encoder import _context
from app.compression.prune.surgery import Surgery
from app.compression.prune.transformer import Block, find_blocks, split_outputs
from tests.compression.prune.helpers import run_exposing as _run
from tests.exports import exporter_models
from tests.helpers import TRANSFORMER

if TYPE_CHECKING:
    from tests.torch_files import TorchProcess

SEQUENCE = 10  # the TorchScript exporter writes torch.nn.MultiheadAttention's key length as a constant
KEEP = ([0, 3], [1, 2])  # heads kept in block 0 and block 1: neither a prefix nor the same in both


def export_torch_encoders(folder: Path) -> dict[str, Path]:
    """Through the TorchScript exporter (opset 17) and the dynamo exporter (opset 18), batch_first, eval:
    - mha: torch.nn.TransformerEncoder, 2 post-LN layers, d_model 64, 4 heads (scaled_dot_product_attention);
    - mha-weights: two torch.nn.MultiheadAttention called as users do, need_weights left on (its bmm path, the
      padding mask over [batch × heads]);
    - chunk, split (TorchScript only): a hand-written block cutting `qkv(x)` with chunk(3, -1) (Slices computed
      from the shape) or split(64, -1) (a Split with sizes).
    Runs in the torch child process."""
    import warnings

    import torch
    from torch import nn

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            hidden: torch.Tensor = self.encoder(x, src_key_padding_mask=mask == 0)
            return hidden

    class Weights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.ModuleList(nn.MultiheadAttention(64, 4, batch_first=True) for _ in range(2))
            self.norms = nn.ModuleList(nn.LayerNorm(64) for _ in range(2))

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            for attention, norm in zip(self.attention, self.norms, strict=True):
                x = norm(x + attention(x, x, x, key_padding_mask=mask == 0)[0])
            return x

    class Chunked(nn.Module):
        def __init__(self, split: bool) -> None:
            super().__init__()
            self.split = split
            self.qkv, self.out = nn.ModuleList(nn.Linear(64, 192) for _ in range(2)), nn.ModuleList(
                nn.Linear(64, 64) for _ in range(2))
            self.norms = nn.ModuleList(nn.LayerNorm(64) for _ in range(2))

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            batch, tokens, _ = x.shape
            bias = (1.0 - mask[:, None, None, :].float()) * -1e4
            for qkv, out, norm in zip(self.qkv, self.out, self.norms, strict=True):
                parts = qkv(x).split(64, dim=-1) if self.split else qkv(x).chunk(3, dim=-1)
                q, k, v = (t.view(batch, tokens, 4, 16).transpose(1, 2) for t in parts)
                context = torch.softmax(q @ k.transpose(-1, -2) / 4.0 + bias, -1) @ v
                x = norm(x + out(context.transpose(1, 2).reshape(batch, tokens, 64)))
            return x

    x, mask = torch.randn(2, SEQUENCE, 64), torch.ones(2, SEQUENCE, dtype=torch.int64)
    paths: dict[str, Path] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, model in (("mha", Padded()), ("mha-weights", Weights()), ("chunk", Chunked(split=False)),
                            ("split", Chunked(split=True))):
            with torch.no_grad():  # layers copied from one made to differ, zero biases made not zero
                for parameter in model.parameters():
                    parameter.add_(torch.randn_like(parameter) * 0.1)
            model.eval()
            paths[f"{name}.torchscript"] = folder / f"{name}.torchscript.onnx"
            torch.onnx.export(model, (x, mask), str(paths[f"{name}.torchscript"]), dynamo=False, opset_version=17,
                              input_names=["x", "mask"], output_names=["hidden"],
                              dynamic_axes={"x": {0: "batch"}, "mask": {0: "batch"}, "hidden": {0: "batch"}})
            if name in ("chunk", "split"):  # the dynamo exporter leaves their weights behind a Transpose
                continue
            dynamic = torch.export.Dim.DYNAMIC
            program = torch.onnx.export(model, (x, mask), dynamo=True, opset_version=18, input_names=["x", "mask"],
                                        output_names=["hidden"], external_data=False,
                                        dynamic_shapes=({0: dynamic, 1: dynamic}, {0: dynamic, 1: dynamic}))
            assert program is not None
            paths[f"{name}.dynamo"] = folder / f"{name}.dynamo.onnx"
            program.save(str(paths[f"{name}.dynamo"]), external_data=False)
    return paths


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, torch_process: TorchProcess) -> dict[str, Path]:
    """Every packed and fused form, normalized as every recipe sees it."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    folder = tmp_path_factory.mktemp("packed")
    raw = {**torch_process.call(export_torch_encoders, folder), "tiny": TRANSFORMER,
           "bert.Attention": exporter_models() / "bert.ort-optimized.onnx"}
    options = FusionOptions("bert")
    options.use_multi_head_attention = True
    fused = optimize_model(str(exporter_models() / "bert.torchscript.onnx"), model_type="bert", num_heads=4,
                           hidden_size=32, opt_level=0, optimization_options=options)
    raw["bert.MultiHeadAttention"] = folder / "bert-mha.onnx"
    fused.save_model_to_file(str(raw["bert.MultiHeadAttention"]))
    tiny = onnx.load(TRANSFORMER)  # what our optimize step writes for packed QKV (a raw 0/1 mask, a scale)
    assert fuse_attention(tiny).count == 2
    for node in tiny.graph.node:  # the sections spelled out, as other writers do: they lose heads too
        if node.op_type == "Attention":
            node.attribute.append(onnx.helper.make_attribute("qkv_hidden_sizes", [64, 64, 64]))
    raw["tiny.Attention"] = folder / "tiny-fused.onnx"
    onnx.save(tiny, str(raw["tiny.Attention"]))
    paths = {}
    for name, path in raw.items():
        paths[name] = folder / f"{name}.normalized.onnx"
        normalize(path, paths[name], None)
    return paths


def _data(name: str, model: Path) -> ModelData:
    if name.startswith("tiny"):
        return from_npz(TRANSFORMER.with_name("tiny_transformer.samples.npz"), graph.io_info(model)[0])
    if name.startswith("bert"):
        return from_npz(exporter_models() / "bert.torchscript.samples.npz", graph.io_info(model)[0])
    rng = np.random.default_rng(0)
    mask = (np.arange(SEQUENCE)[None, :] < rng.integers(3, SEQUENCE + 1, 32)[:, None]).astype(np.int64)
    return ModelData({"x": rng.standard_normal((32, SEQUENCE, 64)).astype(np.float32), "mask": mask}, None,
                     "dataset")


def _blocks(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[Block]:
    names = split_outputs(model)
    values = _run(model, {k: v[:2] for k, v in feeds.items()}, names)
    return find_blocks(model, {n: values[n].shape for n in names})


def _silence(model: onnx.ModelProto, blocks: list[Block], keep: Sequence[Sequence[int]]) -> onnx.ModelProto:
    """A copy whose output projections read nothing from the heads not kept (their input rows zeroed)."""
    silenced = onnx.ModelProto()
    silenced.CopyFrom(model)
    weights = {t.name: t for t in silenced.graph.initializer}
    for block, kept in zip(blocks, keep, strict=True):
        out, dim = block.attention.out, block.attention.head_dim
        rows = np.concatenate([np.arange(h * dim, (h + 1) * dim) for h in range(4) if h not in kept])
        array = numpy_helper.to_array(weights[out.weight]).copy()
        array[(slice(None), rows) if out.transposed else rows] = 0  # a Gemm(transB) keeps it [out, in]
        weights[out.weight].CopyFrom(numpy_helper.from_array(array, out.weight))
    return silenced


TORCH = ["mha.torchscript", "mha.dynamo", "mha-weights.torchscript", "mha-weights.dynamo", "chunk.torchscript",
         "split.torchscript"]
FUSED = ["bert.Attention", "bert.MultiHeadAttention", "tiny.Attention"]
FORMS = ["tiny", *TORCH, *FUSED]


@pytest.mark.parametrize("name", FORMS)
def test_removing_packed_or_fused_heads_equals_silencing_them(name: str, models: dict[str, Path]) -> None:
    model = onnx.load(models[name])
    feeds = {k: v[:6] for k, v in _data(name, models[name]).inputs.items()}
    op = name.split(".")[1] if name in FUSED else None
    assert op is None or any(n.op_type == op and n.domain == "com.microsoft" for n in model.graph.node)
    blocks = _blocks(model, feeds)
    hidden, head_dim = (32, 8) if name.startswith("bert") else (64, 16)
    assert len(blocks) == 2 and blocks[0].end == blocks[1].start
    for block in blocks:
        assert block.attention.packed is not None and (block.ffn is None) == name.startswith(("mha-", "chunk", "split"))
        assert (block.attention.heads, block.attention.head_dim) == (4, head_dim)
    silenced = _silence(model, blocks, KEEP)
    surgery = Surgery(model)
    for block, kept in zip(blocks, KEEP, strict=True):
        surgery.keep_heads(block.attention, kept)
    pruned = surgery.finish()
    onnx.checker.check_model(pruned, full_check=True)
    output = pruned.graph.output[0].name
    want, got = _run(silenced, feeds)[output], _run(pruned, feeds)[output]  # onnxruntime runs it
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(got - _run(onnx.load(models[name]), feeds)[output]).max() > 1e-3  # the heads mattered
    shapes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    attention, width = blocks[0].attention, 2 * head_dim
    # the packed [hidden, 3 × hidden] weight keeps 2 heads in each of Q, K and V; so does each of MHA's three
    assert shapes[attention.query.weight] == (hidden, width if op == "MultiHeadAttention" else 3 * width)
    assert shapes[attention.out.weight] == ((hidden, width) if attention.out.transposed else (width, hidden))
    if op is not None:
        fused = [n for n in pruned.graph.node if n.op_type == op]
        assert [a.i for n in fused for a in n.attribute if a.name == "num_heads"] == [2, 2]
        sizes = [list(a.ints) for n in fused for a in n.attribute if a.name == "qkv_hidden_sizes"]
        assert sizes == ([[32, 32, 32]] * 2 if name == "tiny.Attention" else [])
    assert graph.count_parameters(pruned)[0] < graph.count_parameters(silenced)[0]


@pytest.mark.parametrize("name", ["bert.Attention", "bert.MultiHeadAttention"])
def test_fused_heads_pruned_equal_the_unfused_original_silenced(name: str, models: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """onnxruntime's optimizer keeps the output projections' weights: the original export, those heads silenced,
    computes what the pruned fused graph computes."""
    original = tmp_path / "bert.onnx"
    normalize(exporter_models() / "bert.torchscript.onnx", original, None)
    model = onnx.load(models[name])
    feeds = {k: v[:6] for k, v in _data(name, models[name]).inputs.items()}
    blocks = _blocks(model, feeds)
    surgery = Surgery(model)
    for block, kept in zip(blocks, KEEP, strict=True):
        surgery.keep_heads(block.attention, kept)
    silenced = _silence(onnx.load(original), blocks, KEEP)  # the same weight names
    np.testing.assert_allclose(_run(surgery.finish(), feeds)["last_hidden_state"],
                               _run(silenced, feeds)["last_hidden_state"], atol=1e-4)


@pytest.mark.parametrize("name", ["tiny", *TORCH, "bert.Attention", "tiny.Attention"])
def test_each_head_s_context_is_read_as_the_output_projection_reads_it(name: str, models: dict[str, Path]) -> None:
    """The importance pass reads each packed context as [batch, heads, sequence, head_dim]: merged back, it is
    the output projection's input, token by token ([S, B] in torch's MultiheadAttention)."""
    model = onnx.load(models[name])
    feeds = {k: v[:5] for k, v in _data(name, models[name]).inputs.items()}
    blocks = _blocks(model, feeds)
    for block in blocks:
        attention = block.attention
        merged = model.graph.node[attention.out.matmul].input[0]
        values = _run(model, feeds, [attention.context, merged])
        context = _context(values[attention.context], attention)
        batch, sequence = next(iter(feeds.values())).shape[:2]
        assert context.shape == (batch, 4, sequence, attention.head_dim)
        tokens = context.transpose(0, 2, 1, 3).reshape(batch, sequence, -1)
        reads = values[merged].reshape(-1, 4 * attention.head_dim)
        if name.startswith("mha"):  # [S × B, E]: torch.nn.MultiheadAttention works sequence first
            reads = reads.reshape(sequence, batch, -1).transpose(1, 0, 2).reshape(batch * sequence, -1)
        np.testing.assert_allclose(tokens, reads.reshape(batch, sequence, -1), atol=1e-6)


@pytest.mark.parametrize("name", FORMS)
def test_the_heads_mode_shrinks_packed_and_fused_attention(name: str, models: dict[str, Path],
                                                           make_ctx: Callable[..., StepContext],
                                                           tmp_path: Path) -> None:
    """Through the step: importance on data, the rewrite checked on two samples, the repair (a Gemm's [out, in]
    weight in torch's MultiheadAttention)."""
    model, output = models[name], tmp_path / "pruned.onnx"
    data = _data(name, model)
    notes = prune(model, output, PruneStep(mode="heads", sparsity=0.5), make_ctx(model, train=data))
    assert notes["heads_kept"] == [2, 2] and notes["heads_per_block"] == 4
    assert notes["parameters_after"] < notes["parameters_before"]
    assert notes["plans"][0]["fidelity_before_recovery"] > 0.5 and "fidelity_without_repair" in notes["plans"][0]
    pruned = onnx.load(output)
    weights = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    if name.startswith("tiny"):  # models/build_models.py's names
        assert weights["layers.0.attn.qkv.weight.T"] == (64, 96) and weights["layers.1.attn.out.weight.T"] == (32, 64)
    got = graph.session(output).run(None, next(data.batches(8)))[0]
    assert got.shape == graph.session(model).run(None, next(data.batches(8)))[0].shape


def test_structured_on_the_tiny_transformer_measures_every_plan(make_ctx: Callable[..., StepContext],
                                                                tmp_path: Path) -> None:
    data = from_npz(TRANSFORMER.with_name("tiny_transformer.samples.npz"), graph.io_info(TRANSFORMER)[0])
    notes = prune(TRANSFORMER, tmp_path / "out.onnx", PruneStep(mode="structured", sparsity=0.5),
                  make_ctx(TRANSFORMER, train=data))
    assert notes["importance"] == "activation" and notes["blocks"] == 2
    assert {p["plan"] for p in notes["plans"]} >= {"heads+ffn", "layers"}
    assert notes["parameters_after"] < 0.8 * notes["parameters_before"]


def test_packed_attention_that_cannot_be_pruned_exactly_is_named(models: dict[str, Path], tmp_path: Path) -> None:
    tiny = onnx.load(models["tiny"])
    feeds = {k: v[:2] for k, v in _data("tiny", models["tiny"]).inputs.items()}
    sliced = {n.output[0] for n in tiny.graph.node if n.op_type == "Slice"}
    query = next(n for n in tiny.graph.node if n.op_type == "Squeeze" and n.input[0] in sliced).output[0]  # Q
    tiny.graph.output.append(onnx.helper.make_empty_tensor_value_info(query))
    with pytest.raises(UnsupportedModel, match=f"'{query}' is an output of the model"):
        _blocks(tiny, feeds)
    from onnxruntime.transformers.optimizer import optimize_model

    vit = optimize_model(str(exporter_models() / "vit.torchscript.onnx"), model_type="vit", num_heads=4,
                         hidden_size=32, opt_level=0)  # pre-LN: the residual is SkipLayerNormalization's sum
    vit.save_model_to_file(str(tmp_path / "vit.onnx"))
    with pytest.raises(UnsupportedModel, match="pre-LN block fused into SkipLayerNormalization"):
        find_blocks(onnx.load(tmp_path / "vit.onnx"))
