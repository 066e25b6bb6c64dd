"""Build SlimServe's small example ONNX models and matching sample inputs.

Usage:
    .venv/bin/python models/build_models.py [--out models] [--force]

Produces, in ``--out``:
    digits_cnn.onnx, digits_cnn.samples.npz              (trained on sklearn digits)
    digits_mlp.onnx, digits_mlp.samples.npz              (trained on sklearn digits)
    tiny_transformer.onnx, tiny_transformer.samples.npz  (seeded random weights)

Everything is seeded and single-threaded so two ``--force`` runs give the
same accuracies (and, in practice, byte-identical files).
"""

# ruff: noqa: T201  -- a CLI build script: printing is its interface

from __future__ import annotations

import argparse
import logging
import random
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir
import onnx_ir.passes.common as common_passes
import onnxruntime as ort
import onnxscript.optimizer
import onnxscript.rewriter
import torch
from onnxscript.rewriter.rules import common as rules
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
OPSET = 18
MAX_BYTES = 1_000_000  # every artefact must stay under 1 MB
ATOL = 1e-4  # allowed ORT-vs-torch max abs difference


# ---------------------------------------------------------------- determinism


def seed_everything(seed: int = SEED) -> None:
    """Reset every RNG we touch so each model builds identically on its own."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # multi-threaded CPU reductions can reorder float sums
    torch.use_deterministic_algorithms(True)


# ----------------------------------------------------------------------- data


@dataclass(frozen=True)
class Digits:
    x_train: np.ndarray  # float32 [N, 64], pixels scaled to [0, 1]
    y_train: np.ndarray  # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split() -> Digits:
    """Fixed stratified 75/25 split of sklearn's bundled 8x8 digits."""
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)  # raw pixels are 0..16
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)
    return Digits(x_tr, y_tr, x_te, y_te)


# --------------------------------------------------------------------- models


class ResidualBlock(nn.Module):
    """Conv-BN-ReLU-Conv-BN + identity, so pruning must respect a residual Add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        out: torch.Tensor = self.relu(x + y)
        return out


class DigitsCNN(nn.Module):
    """[N,1,8,8] -> [N,10]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            ResidualBlock(32),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits


class DigitsMLP(nn.Module):
    """[N,64] -> [N,10]."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(x)
        return logits


class SelfAttention(nn.Module):
    """Hand-written MHA: exports to plain MatMul/Softmax, avoiding the fused
    fast path nn.TransformerEncoderLayer takes in eval mode."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, key_pad: torch.Tensor) -> torch.Tensor:
        # key_pad: bool [B, 1, 1, S], True where the token is padding.
        b, s, h = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, S, D]
        scores = q @ k.transpose(-2, -1) * (self.head_dim**-0.5)
        scores = scores.masked_fill(key_pad, float("-inf"))
        ctx = scores.softmax(dim=-1) @ v
        out: torch.Tensor = self.out(ctx.transpose(1, 2).reshape(b, s, h))
        return out


class EncoderLayer(nn.Module):
    """Pre-LN block: x + Attn(LN(x)); x + FFN(LN(x)) with GELU."""

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = SelfAttention(hidden, heads)
        self.ln2 = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))

    def forward(self, x: torch.Tensor, key_pad: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), key_pad)
        out: torch.Tensor = x + self.ffn(self.ln2(x))
        return out


class TinyTransformer(nn.Module):
    """(input_ids [B,S], attention_mask [B,S]) -> embedding [B,16]."""

    def __init__(
        self,
        vocab: int = 1000,
        hidden: int = 64,
        heads: int = 4,
        ffn: int = 128,
        layers: int = 2,
        max_len: int = 256,
        out_dim: int = 16,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_len, hidden)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, ffn) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, out_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tok(input_ids) + self.pos(pos)
        key_pad = (attention_mask == 0)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, key_pad)
        x = self.ln_f(x)
        # Masked mean pooling; clamp guards against an all-padding row.
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        embedding: torch.Tensor = self.head(pooled)
        return embedding


# ------------------------------------------------------------------- training


def train_classifier(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
) -> None:
    """AdamW + one-cycle LR; the shuffle uses its own seeded generator."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(xt) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr * 3, total_steps=steps)
    gen = torch.Generator().manual_seed(SEED)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def torch_predict(model: nn.Module, *inputs: np.ndarray) -> np.ndarray:
    out: np.ndarray = model(*(torch.from_numpy(a) for a in inputs)).numpy()
    return out


# --------------------------------------------------------------------- export


def export_onnx(
    model: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: dict[str, dict[int, torch.export.Dim]],
) -> None:
    """Dynamo export into one self-contained file, then normalise it."""
    model.eval()
    with warnings.catch_warnings():
        # Benign: inputs sharing one Dim trigger "axis name ... will not be used".
        warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
        program = torch.onnx.export(
            model,
            example,
            dynamo=True,
            opset_version=OPSET,
            external_data=False,
            dynamic_shapes=dynamic_shapes,
            optimize=False,  # see optimize_graph()
            verbose=False,
        )
    require(program is not None, "torch.onnx.export returned no program")
    assert program is not None  # for the type checker
    optimize_graph(program.model)
    restore_weight_names(program.model, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    rename_graph_io(program.model, input_names, output_names)
    proto = program.model_proto
    strip_node_metadata(proto)
    onnx.save_model(proto, str(path), save_as_external_data=False)


# Public onnxscript rules we do want. The exporter's default optimize=True also
# fuses BatchNorm into Conv and deduplicates equal initializers (e.g. untrained
# LayerNorm gammas end up shared across layers); both would hide exactly the
# structure SlimServe's pruning/folding passes are meant to be tested on.
_REWRITE_RULES = [
    rules.add_0_rule,
    rules.sub_0_rule,
    rules.mul_by_1_rule,
    rules.div_by_1_rule,
    rules.dropout_inference_rule,
    rules.dropout_zero_rule,
    rules.no_op_cast_rule,
    rules.no_op_expand_rule,
    rules.no_op_transpose_rule,
    rules.cast_cast_rule,
    rules.collapse_slice_rule,
    rules.collapse_slice2_rule,
    rules.materialize_reshape_shape_rule,
    rules.reshape_reshape_rule,
    rules.squeeze_reshape_1d_rule,
    rules.unsqueeze_unsqueeze_rule,
    rules.transpose_transpose_rule,
    rules.remove_optional_bias_from_conv_rule,
    rules.remove_optional_bias_from_gemm_rule,
]


def optimize_graph(model: onnx_ir.Model, iterations: int = 2) -> None:
    """Constant folding + safe cleanups, without BN fusion or initializer dedup."""
    for _ in range(iterations):
        onnxscript.optimizer.fold_constants(model)
        onnxscript.rewriter.rewrite(model, pattern_rewrite_rules=_REWRITE_RULES)
    onnx_ir.passes.Sequential(
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedFunctionsPass(),  # type: ignore[no-untyped-call]
        common_passes.RemoveUnusedOpsetsPass(),
        # Remaining Constant nodes become initializers, as the default pipeline does.
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.NameFixPass(),
    )(model)


def restore_weight_names(model: onnx_ir.Model, param_shapes: dict[str, tuple[int, ...]]) -> None:
    """Constant folding turns Linear weights into anonymous `val_N` (weight.T for
    MatMul); give them back a name tied to the torch parameter."""
    for value in list(model.graph.initializers.values()):
        sources = value.meta.get(onnxscript.optimizer.FOLDED_FROM_KEY, set())
        params = [s for s in sources if s in param_shapes]
        if len(sources) != 1 or len(params) != 1 or value.shape is None:
            continue
        src, shape = params[0], tuple(value.shape.dims)
        new = f"{src}.T" if shape == param_shapes[src][::-1] and len(shape) == 2 else f"{src}.folded"
        if new not in model.graph.initializers:
            value.name = new


def rename_graph_io(model: onnx_ir.Model, inputs: list[str], outputs: list[str]) -> None:
    """Name graph inputs/outputs ourselves instead of via output_names=...:
    the exporter names internal values after their aten op (e.g. `embedding`),
    and its own renaming then produces duplicate names that break SSA."""
    graph = model.graph
    values = {v.name: v for v in graph.inputs}
    values.update({v.name: v for node in graph for v in node.outputs})
    for value, new in [*zip(graph.inputs, inputs, strict=True), *zip(graph.outputs, outputs, strict=True)]:
        clash = values.get(new)
        if clash is not None and clash is not value:
            clash.name = f"{new}__internal"  # move the internal value out of the way
        value.name = new


def strip_node_metadata(proto: onnx.ModelProto) -> None:
    """Drop per-node stack traces the exporter records: they embed absolute
    source paths, which make the file depend on where it was built."""

    def clean(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.HasField("g"):
                    clean(attr.g)
                for g in attr.graphs:
                    clean(g)

    clean(proto.graph)


def add_model_metadata(path: Path, meta: dict[str, str]) -> None:
    """Record provenance (and accuracy) so a skipped build can still report it."""
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, meta)
    onnx.save_model(proto, str(path), save_as_external_data=False)


def check_onnx(path: Path, dynamic_inputs: dict[str, list[int]]) -> onnx.ModelProto:
    """Structural checks: validity, single file, opset, symbolic dims."""
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    for init in proto.graph.initializer:
        require(init.data_location != onnx.TensorProto.EXTERNAL, f"{path}: external data")
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    require(opset >= 17, f"{path}: opset {opset} < 17")
    assert_no_shared_weights(proto, path)
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        for axis in dynamic_inputs.get(inp.name, []):
            require(bool(dims[axis].dim_param), f"{path}: {inp.name}[{axis}] is not dynamic")
    return proto


def assert_no_shared_weights(proto: onnx.ModelProto, path: Path) -> None:
    """Each float weight must feed exactly one node, so pruning one layer can't
    silently edit another."""
    floats = {  # scalars such as the attention scale may legitimately be shared
        i.name
        for i in proto.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT and int(np.prod(i.dims)) > 1
    }
    users: dict[str, int] = {}
    for node in proto.graph.node:
        for name in set(node.input) & floats:
            users[name] = users.get(name, 0) + 1
    shared = sorted(n for n, c in users.items() if c > 1)
    require(not shared, f"{path}: initializers shared between nodes: {shared}")


def require(cond: bool, msg: str) -> None:
    """Checks that must also run under `python -O` (unlike assert)."""
    if not cond:
        raise RuntimeError(msg)


def ort_session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # deterministic and quiet
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def assert_close(ref: np.ndarray, got: np.ndarray, what: str) -> float:
    diff = float(np.max(np.abs(ref - got)))
    require(diff <= ATOL, f"{what}: ORT vs torch max |diff| {diff:.2e} > {ATOL}")
    return diff


def describe_io(proto: onnx.ModelProto) -> str:
    def fmt(vi: onnx.ValueInfoProto) -> str:
        tt = vi.type.tensor_type
        dims = [d.dim_param or str(d.dim_value) for d in tt.shape.dim]
        return f"{vi.name}:{onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)}[{','.join(dims)}]"

    ins = ", ".join(fmt(v) for v in proto.graph.input)
    outs = ", ".join(fmt(v) for v in proto.graph.output)
    return f"{ins} -> {outs}"


def op_histogram(proto: onnx.ModelProto) -> str:
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return " ".join(f"{k}x{v}" for k, v in sorted(counts.items()))


# ------------------------------------------------------------------- builders


@dataclass
class BuildResult:
    name: str
    params: int
    accuracy: float | None  # None for the untrained transformer
    files: list[Path]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_digits_classifier(
    name: str,
    model_fn: Callable[[], nn.Module],
    to_input: Callable[[np.ndarray], np.ndarray],
    epochs: int,
    out: Path,
) -> BuildResult:
    """Shared path for the CNN and the MLP: train, export, verify, sample."""
    seed_everything()
    data = load_digits_split()
    model = model_fn()
    x_train, x_test = to_input(data.x_train), to_input(data.x_test)
    train_classifier(model, x_train, data.y_train, epochs=epochs)

    ref = torch_predict(model, x_test)
    acc = float((ref.argmax(1) == data.y_test).mean())

    onnx_path = out / f"{name}.onnx"
    batch = torch.export.Dim("batch")
    export_onnx(
        model,
        (torch.from_numpy(x_test[:4]),),
        onnx_path,
        ["input"],
        ["logits"],
        {"x": {0: batch}},
    )
    add_model_metadata(
        onnx_path,
        {
            "slimserve.source": "models/build_models.py",
            "slimserve.dataset": "sklearn load_digits, test_size=0.25, random_state=0, stratified",
            "slimserve.test_accuracy": f"{acc:.4f}",
            "slimserve.params": str(count_params(model)),
        },
    )
    proto = check_onnx(onnx_path, {"input": [0]})

    sess = ort_session(onnx_path)
    got = sess.run(["logits"], {"input": x_test})[0]
    diff = assert_close(ref, got, name)
    # A different batch size proves the dynamic dim actually works at runtime.
    assert_close(ref[:1], sess.run(["logits"], {"input": x_test[:1]})[0], f"{name} batch=1")
    ort_acc = float((got.argmax(1) == data.y_test).mean())
    require(ort_acc == acc, f"{name}: ORT accuracy {ort_acc} != torch {acc}")

    samples = out / f"{name}.samples.npz"
    np.savez_compressed(samples, input=x_test.astype(np.float32), labels=data.y_test.astype(np.int64))

    print(f"  [{name}] test acc {acc:.4f} (torch == ORT), max|diff| {diff:.1e}")
    print(f"  [{name}] io: {describe_io(proto)}")
    print(f"  [{name}] ops: {op_histogram(proto)}")
    return BuildResult(name, count_params(model), acc, [onnx_path, samples])


def build_digits_cnn(out: Path) -> BuildResult:
    return build_digits_classifier(
        "digits_cnn", DigitsCNN, lambda x: x.reshape(-1, 1, 8, 8), epochs=30, out=out
    )


def build_digits_mlp(out: Path) -> BuildResult:
    return build_digits_classifier("digits_mlp", DigitsMLP, lambda x: x, epochs=60, out=out)


def make_token_batch(rng: np.random.Generator, batch: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """Random ids in [1, 1000) plus a mask with random trailing padding.

    Padded positions keep a real id (not 0) so every id stays a valid token and
    only the mask decides what is padding."""
    ids = rng.integers(1, 1000, size=(batch, seq), dtype=np.int64)
    lengths = rng.integers(max(1, seq // 4), seq + 1, size=batch)
    lengths[0] = seq  # keep at least one unpadded row
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return ids, mask


def build_tiny_transformer(out: Path) -> BuildResult:
    name = "tiny_transformer"
    seed_everything()
    model = TinyTransformer().eval()  # untrained: seeded random weights
    rng = np.random.default_rng(SEED)

    onnx_path = out / f"{name}.onnx"
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=256)
    ex_ids, ex_mask = make_token_batch(rng, 2, 8)
    export_onnx(
        model,
        (torch.from_numpy(ex_ids), torch.from_numpy(ex_mask)),
        onnx_path,
        ["input_ids", "attention_mask"],
        ["embedding"],
        {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )
    add_model_metadata(
        onnx_path,
        {
            "slimserve.source": "models/build_models.py",
            "slimserve.note": "untrained, seeded random weights (torch.manual_seed(0))",
            "slimserve.params": str(count_params(model)),
        },
    )
    proto = check_onnx(onnx_path, {"input_ids": [0, 1], "attention_mask": [0, 1]})

    sess = ort_session(onnx_path)
    worst = 0.0
    for b in (1, 4):
        for s in (8, 32):
            ids, mask = make_token_batch(rng, b, s)
            ref = torch_predict(model, ids, mask)
            got = sess.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]
            worst = max(worst, assert_close(ref, got, f"{name} b={b} s={s}"))

    ids, mask = make_token_batch(rng, 64, 16)
    samples = out / f"{name}.samples.npz"
    np.savez_compressed(samples, input_ids=ids, attention_mask=mask)
    ref = torch_predict(model, ids, mask)
    got = sess.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]
    worst = max(worst, assert_close(ref, got, f"{name} samples"))

    print(f"  [{name}] ORT == torch for batch {{1,4}} x seq {{8,32}} + samples, max|diff| {worst:.1e}")
    print(f"  [{name}] io: {describe_io(proto)}")
    print(f"  [{name}] ops: {op_histogram(proto)}")
    return BuildResult(name, count_params(model), None, [onnx_path, samples])


# ------------------------------------------------------------------------ CLI


BUILDERS: dict[str, Callable[[Path], BuildResult]] = {
    "digits_cnn": build_digits_cnn,
    "digits_mlp": build_digits_mlp,
    "tiny_transformer": build_tiny_transformer,
}


def outputs_for(name: str, out: Path) -> list[Path]:
    return [out / f"{name}.onnx", out / f"{name}.samples.npz"]


def result_from_existing(name: str, out: Path) -> BuildResult:
    """Rebuild the summary of a skipped model from the metadata it carries."""
    proto = onnx.load(str(out / f"{name}.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    acc = meta.get("slimserve.test_accuracy")
    return BuildResult(
        name,
        int(meta.get("slimserve.params", "0")),
        float(acc) if acc is not None else None,
        outputs_for(name, out),
    )


def summary_line(res: BuildResult) -> str:
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 1024:.1f} KiB" for p in res.files)
    acc = f"{res.accuracy:.4f}" if res.accuracy is not None else "n/a (untrained)"
    return f"{res.name}: {sizes}; params {res.params:,}; test acc {acc}"


def quiet_exporter_noise() -> None:
    """The exporter logs about missing torchvision ops and a torch-internal
    deprecation on every call; neither concerns these models."""
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec.*")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--force", action="store_true", help="rebuild even if outputs exist")
    args = parser.parse_args(argv)
    quiet_exporter_noise()
    args.out.mkdir(parents=True, exist_ok=True)

    results = []
    for name, build in BUILDERS.items():
        if not args.force and all(p.exists() for p in outputs_for(name, args.out)):
            print(f"{name}: outputs exist, skipping (use --force to rebuild)")
            results.append(result_from_existing(name, args.out))
            continue
        print(f"{name}: building")
        results.append(build(args.out))

    print("\nsummary:")
    for res in results:
        print("  " + summary_line(res))
        for p in res.files:
            require(p.stat().st_size < MAX_BYTES, f"{p} is {p.stat().st_size} bytes (limit {MAX_BYTES})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
