"""Structured pruning of transformer encoders: attention heads, FFN neurons and whole blocks, chosen on data.

Importance is activation-based, measured with onnxruntime on the step's training samples:
- a head's is the mean L2 norm, over real tokens, of what it adds to its block's output (its slice of the
  attention context times its rows of the output projection);
- an FFN neuron's is the mean |activation| over real tokens times the L2 norm of its row of the down-projection;
- a block's is what dropping it alone costs: 1 - the output fidelity (cosine, or top-1 agreement) without it.
Heads and neurons are ranked within each block (every block keeps the same share, at least one); blocks are
dropped least important first. Packed QKV and fused attention are pruned by rewriting the exporter's own shape
arithmetic, so before anything is ranked the rewrite is checked on two samples: the graph without every other head
must compute what the original computes with those heads' output rows zeroed, or the model is refused.

After the cut, each shrunken output projection is repaired by least squares (Kwon et al., "A Fast Post-Training
Pruning Framework for Transformers", 2022): the kept rows are refit so that, on the same samples, the projection
reproduces what the full layer produced — from the Gram matrix of the layer's input, collected in the same pass.

Mode `structured` on a transformer removes the requested share of the encoder blocks' parameters in the
proportion measured to cost least: it builds each plan (heads and neurons alike; whole blocks; half blocks, half
width; FFN neurons alone where they suffice), measures every one on held-out samples, and keeps the best.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from app.compression import graph
from app.compression.config import PruneStep
from app.compression.context import StepContext
from app.compression.data import ModelData
from app.compression.errors import DataRequired, InvalidRecipe, UnsupportedModel
from app.compression.evaluate import is_classifier
from app.compression.prune.apply import keep_count, lift_constants
from app.compression.prune.graphview import Projection
from app.compression.prune.layout import heads_first
from app.compression.prune.report import latency_notes, parameter_notes, size_notes
from app.compression.prune.surgery import Surgery
from app.compression.prune.transformer import Attention, Block, find_blocks, split_outputs
from app.compression.scoring import compare, session_exposing

IMPORTANCE_SAMPLES = 256
MIN_SAMPLES = 8
VALIDATION_SAMPLES = 64
_BATCH = 16
_RIDGE = 1e-4  # relative to the Gram matrix's mean diagonal: keeps the repair well-posed on few tokens
_EXACT = 1e-4  # the packed rewrite's check: float reordering only, relative to the output's largest magnitude


@dataclass
class Plan:
    """What to remove: a share of each block's heads and FFN neurons, and whole blocks."""

    name: str
    heads: float = 0.0
    ffn: float = 0.0
    layers: int = 0


@dataclass
class _Statistics:
    """One pass of the original over the importance samples, per block."""

    head_scores: list[np.ndarray]
    neuron_scores: list[np.ndarray]
    head_gram: list[np.ndarray]
    """Gram matrix of the output projection's input (the merged heads), for the repair."""
    neuron_gram: list[np.ndarray]


def is_transformer(model: onnx.ModelProto) -> bool:
    """Attention blocks this module can prune were found (without running the model)."""
    try:
        find_blocks(model)
    except UnsupportedModel:
        return False
    return True


def run_encoder(model: Path, output: Path, step: PruneStep, ctx: StepContext) -> dict[str, Any]:
    started = time.perf_counter()
    if ctx.train is None or ctx.train.source == "synthetic":
        raise DataRequired(f"pruning a transformer's {_what(step)} ranks them on real inputs: upload a dataset for "
                           "this model (text or arrays); generated token ids would rank them on noise")
    if len(ctx.train) < MIN_SAMPLES:
        raise DataRequired(f"the dataset has {len(ctx.train)} samples; pruning a transformer needs at least "
                           f"{MIN_SAMPLES} "
                           "(some rank the heads and neurons, others check the result)")
    ctx.progress(0.0, "finding the encoder blocks")
    proto = graph.load(model)
    lift_constants(proto)
    parameters_before = graph.count_parameters(proto)
    rank_data, check_data = _split(ctx.train, ctx.seed)
    shapes = _split_shapes(proto, rank_data, ctx.threads)
    blocks = find_blocks(proto, shapes)
    plans = _plans(step, blocks, proto)
    if any(p.heads for p in plans):
        _check_packed(proto, blocks, rank_data, ctx.threads)
    ctx.progress(0.1, "measuring head and neuron importance")
    stats = _statistics(proto, blocks, rank_data, ctx.threads)
    reference = _reference(proto, check_data, ctx.threads)
    block_cost = _block_costs(proto, blocks, check_data, reference, ctx) if any(p.layers for p in plans) else None
    ctx.progress(0.6, "building the pruned model")
    measured = []
    best: tuple[float, onnx.ModelProto, Plan, dict[str, Any]] | None = None
    for plan in plans:
        candidate, details = _apply(proto, blocks, stats, block_cost, plan, step.repair)
        fidelity = _fidelity(reference, _run(candidate, check_data, ctx.threads))
        entry = {"plan": plan.name, "heads_removed_share": plan.heads, "ffn_removed_share": plan.ffn,
                 "layers_dropped": plan.layers, "parameters": graph.count_parameters(candidate)[0],
                 "fidelity_before_recovery": round(fidelity, 6)}
        if step.repair and len(plans) == 1:  # what the repair bought, measured on the same samples
            plain, _ = _apply(proto, blocks, stats, block_cost, plan, repair=False)
            entry["fidelity_without_repair"] = round(_fidelity(reference, _run(plain, check_data, ctx.threads)),
                                                     6)
        measured.append(entry)
        if best is None or fidelity > best[0]:
            best = (fidelity, candidate, plan, details)
    assert best is not None
    _, pruned, chosen, details = best
    graph.save(pruned, output)
    ctx.progress(0.85, "checking the result")
    graph.check_step_output(model, output, "prune")
    notes: dict[str, Any] = {
        "mode": step.mode, "sparsity": step.sparsity, "importance": "activation",
        "importance_detail": ("heads: mean L2 norm of each head's contribution to its block's output; FFN neurons: "
                              "mean |activation| x L2 norm of the down-projection row; blocks: fidelity lost when "
                              f"the block alone is dropped; on {len(rank_data)} training samples, checked on "
                              f"{len(check_data)} others"),
        "repair": "least-squares refit of the shrunken output projections" if step.repair else None,
        "plan": chosen.name, "plans": measured, "blocks": len(blocks),
        "heads_per_block": blocks[0].attention.heads, **details,
        **parameter_notes(parameters_before, graph.count_parameters(pruned)),
        **size_notes(model, output),
    }
    ctx.progress(0.9, "measuring")
    notes["latency"] = latency_notes(model, output, ctx)
    notes["seconds"] = round(time.perf_counter() - started, 3)
    ctx.progress(1.0, "done")
    return notes


def _what(step: PruneStep) -> str:
    return {"heads": "attention heads", "ffn": "FFN neurons", "layers": "blocks"}.get(step.mode,
                                                                                    "heads, neurons and blocks")


def _split(data: ModelData, seed: int) -> tuple[ModelData, ModelData]:
    order = np.random.default_rng(seed).permutation(len(data))
    held = min(max(len(data) // 4, 2), VALIDATION_SAMPLES)
    return (data.subset(np.sort(order[held:held + IMPORTANCE_SAMPLES])), data.subset(np.sort(order[:held])))


# ---- plans -------------------------------------------------------------------------------------------------------

def _plans(step: PruneStep, blocks: list[Block], model: onnx.ModelProto) -> list[Plan]:
    count = len(blocks)
    if step.mode == "heads":
        return [Plan("heads", heads=step.sparsity)]
    if step.mode == "ffn":
        return [Plan("ffn", ffn=step.sparsity)]
    if step.mode == "layers":
        dropped = count - keep_count(count, step.sparsity)
        if dropped == 0:
            raise InvalidRecipe(f"sparsity {step.sparsity} drops no block of {count}: use at least {1 / count:.3g}")
        return [Plan("layers", layers=dropped)]
    attention, ffn = _block_widths(model, blocks[0])
    share = step.sparsity
    plans = [Plan("heads+ffn", heads=share, ffn=share)]
    depth = round(share * count)
    if 0 < depth < count:
        plans.append(Plan("layers", layers=depth))
    half = math.floor(share * count / 2)
    if 0 < half < count:
        rest = (share * count - half) / (count - half)
        if rest < 0.95:
            plans.append(Plan("layers+heads+ffn", heads=rest, ffn=rest, layers=half))
    if ffn and share * (attention + ffn) <= 0.9 * ffn:
        plans.append(Plan("ffn", ffn=share * (attention + ffn) / ffn))
    return plans


def _block_widths(model: onnx.ModelProto, block: Block) -> tuple[int, int]:
    """(attention parameters, FFN parameters) of one block."""
    sizes = {t.name: math.prod(t.dims) for t in model.graph.initializer}
    attention = block.attention
    # packed QKV is one projection standing for all three
    projections = list({p.weight: p for p in (attention.query, attention.key, attention.value, attention.out)}.values())
    ffn = [block.ffn.up, block.ffn.down] if block.ffn is not None else []

    def total(items: list[Any]) -> int:
        return sum(sizes[p.weight] + (sizes[p.bias] if p.bias else 0) for p in items)

    return total(projections), total(ffn)


def _apply(model: onnx.ModelProto, blocks: list[Block], stats: _Statistics, block_cost: np.ndarray | None,
           plan: Plan, repair: bool) -> tuple[onnx.ModelProto, dict[str, Any]]:
    candidate = onnx.ModelProto()
    candidate.CopyFrom(model)
    surgery = Surgery(candidate)
    weights = {t.name: t for t in model.graph.initializer}

    def original(name: str) -> np.ndarray:
        return numpy_helper.to_array(weights[name])

    kept_heads, kept_neurons = [], []
    for index, block in enumerate(blocks):
        heads = np.arange(block.attention.heads)
        if plan.heads:
            keep = keep_count(block.attention.heads, plan.heads)
            heads = np.sort(np.argsort(-stats.head_scores[index], kind="stable")[:keep])
            surgery.keep_heads(block.attention, heads.tolist())
            if repair:
                columns = _head_columns(heads, block.attention.head_dim)
                out = block.attention.out
                refit = _refit(stats.head_gram[index], _in_out(original(out.weight), out), columns)
                surgery.set_weight(out.matmul, _in_out(refit, out))
        kept_heads.append(len(heads))
        if block.ffn is not None and plan.ffn:
            width = len(stats.neuron_scores[index])
            keep = keep_count(width, plan.ffn)
            neurons = np.sort(np.argsort(-stats.neuron_scores[index], kind="stable")[:keep])
            surgery.keep_neurons(block.ffn, neurons)
            if repair:
                surgery.set_weight(block.ffn.down.matmul,
                                   _refit(stats.neuron_gram[index], original(block.ffn.down.weight), neurons))
            kept_neurons.append(int(keep))
        elif block.ffn is not None:
            kept_neurons.append(len(stats.neuron_scores[index]))
    dropped: list[int] = []
    if plan.layers:
        assert block_cost is not None
        dropped = sorted(np.argsort(block_cost, kind="stable")[:plan.layers].tolist())
        surgery.drop_blocks(blocks, dropped)
    result = surgery.finish()
    details = {"heads_kept": [h for i, h in enumerate(kept_heads) if i not in dropped],
               "ffn_kept": [n for i, n in enumerate(kept_neurons) if i not in dropped],
               "blocks_dropped": dropped,
               "block_costs": [round(float(c), 6) for c in block_cost] if block_cost is not None else None}
    return result, details


def _in_out(weight: np.ndarray, projection: Projection) -> np.ndarray:
    """[in, out] from a projection's stored weight, and back (a Gemm with transB keeps it [out, in])."""
    return weight.T if projection.transposed else weight


def _head_columns(heads: np.ndarray, head_dim: int) -> np.ndarray:
    return np.concatenate([np.arange(h * head_dim, (h + 1) * head_dim) for h in heads.tolist()])


def _refit(gram: np.ndarray, weight: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Rows for the kept inputs that best reproduce X @ W (all inputs) from X[:, kept], in least squares."""
    inner = gram[np.ix_(kept, kept)]
    ridge = _RIDGE * float(np.mean(np.diag(inner))) + 1e-12
    target = gram[kept] @ weight.astype(np.float64)
    solved = np.linalg.solve(inner + ridge * np.eye(len(kept)), target)
    return solved.astype(weight.dtype)


# ---- measurements ------------------------------------------------------------------------------------------------

def _session(model: onnx.ModelProto, extra: list[str], threads: int) -> ort.InferenceSession:
    if model.ByteSize() > 2**31 - 2**20:
        raise UnsupportedModel("pruning transformers over 2 GB is not supported yet")
    return session_exposing(model, extra, threads)


def _run(model: onnx.ModelProto, data: ModelData, threads: int) -> list[np.ndarray]:
    session = _session(model, [], threads)
    chunks = [session.run(None, feeds) for feeds in data.batches(_BATCH)]
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def _reference(model: onnx.ModelProto, data: ModelData, threads: int) -> list[tuple[str, np.ndarray]]:
    return list(zip([v.name for v in model.graph.output], _run(model, data, threads), strict=True))


def _split_shapes(model: onnx.ModelProto, data: ModelData, threads: int) -> dict[str, tuple[int, ...]]:
    names = split_outputs(model)
    if not names:
        find_blocks(model)  # raises the reason attention was not found
        return {}  # fused attention without a bias: its attributes say it all
    session = _session(model, names, threads)
    values = session.run(names, next(data.take(2).batches(2)))
    return {name: tuple(v.shape) for name, v in zip(names, values, strict=True)}


def _token_weights(feeds: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """[batch, sequence] weights of real tokens: the attention mask when one matches, else every position."""
    for name, value in feeds.items():
        if "mask" in name.lower() and value.ndim == 2 and tuple(value.shape) == shape:
            return value.astype(np.float64)
    return np.ones(shape)


def _statistics(model: onnx.ModelProto, blocks: list[Block], data: ModelData, threads: int) -> _Statistics:
    names: list[str] = []
    for block in blocks:
        names.append(block.attention.context)
        if block.ffn is not None:
            names.append(_down_input(model, block))
    session = _session(model, names, threads)
    tensors = {t.name: t for t in model.graph.initializer}
    outs = [_in_out(numpy_helper.to_array(tensors[b.attention.out.weight]), b.attention.out).astype(np.float64)
            for b in blocks]
    downs = [numpy_helper.to_array(tensors[b.ffn.down.weight]).astype(np.float64) if b.ffn is not None else None
             for b in blocks]
    down_norms = [np.linalg.norm(d, axis=1) if d is not None else None for d in downs]
    heads = [np.zeros(b.attention.heads) for b in blocks]
    head_gram = [np.zeros((len(o), len(o))) for o in outs]
    neurons = [np.zeros(len(d)) if d is not None else np.zeros(0) for d in downs]
    neuron_gram = [np.zeros((len(d), len(d))) if d is not None else np.zeros(0) for d in downs]
    weight_total = 0.0
    for feeds in data.batches(_BATCH):
        values = dict(zip(names, session.run(names, feeds), strict=True))
        contexts = [_context(values[b.attention.context], b.attention) for b in blocks]
        first = contexts[0]  # [batch, heads, sequence, head_dim]
        mask = _token_weights(feeds, (first.shape[0], first.shape[2]))
        root = np.sqrt(mask.reshape(-1, 1))
        weight_total += float(mask.sum())
        for index, block in enumerate(blocks):
            context = contexts[index].astype(np.float64)
            batch, count, sequence, dim = context.shape
            per_head = np.einsum("bhsd,hde->bhse", context, outs[index].reshape(count, dim, -1))
            heads[index] += np.einsum("bhs,bs->h", np.linalg.norm(per_head, axis=-1), mask)
            merged = context.transpose(0, 2, 1, 3).reshape(batch * sequence, count * dim) * root
            head_gram[index] += merged.T @ merged
            if block.ffn is not None:
                hidden = values[_down_input(model, block)].astype(np.float64)
                flat = hidden.reshape(-1, hidden.shape[-1]) * root
                neurons[index] += np.abs(flat).sum(0) * down_norms[index]
                neuron_gram[index] += flat.T @ flat
    scale = 1.0 / max(weight_total, 1.0)
    return _Statistics(head_scores=[h * scale for h in heads], neuron_scores=[n * scale for n in neurons],
                       head_gram=[g * scale for g in head_gram], neuron_gram=[g * scale for g in neuron_gram])


def _context(value: np.ndarray, attention: Attention) -> np.ndarray:
    """What each head adds before the output projection, as [batch, heads, sequence, head_dim]."""
    if attention.packed is None:
        return value
    return heads_first(value, attention.packed.context, attention.packed.head, attention.packed.batch)


def _check_packed(model: onnx.ModelProto, blocks: list[Block], data: ModelData, threads: int) -> None:
    """Without every other head, a packed or fused attention must compute what the original computes with those
    heads' output-projection rows zeroed (the other sub-layers untouched); else the rewrite missed a head count."""
    packed = [b for b in blocks if b.attention.packed is not None and b.attention.heads > 1]
    if not packed:
        return
    pruned, silenced = onnx.ModelProto(), onnx.ModelProto()
    pruned.CopyFrom(model)
    silenced.CopyFrom(model)
    surgery = Surgery(pruned)
    weights = {t.name: t for t in silenced.graph.initializer}
    for block in packed:
        attention = block.attention
        kept = list(range(0, attention.heads, 2))
        surgery.keep_heads(attention, kept)
        dropped = _head_columns(np.setdiff1d(np.arange(attention.heads), kept), attention.head_dim)
        weight = _in_out(numpy_helper.to_array(weights[attention.out.weight]), attention.out).copy()
        weight[dropped] = 0
        weights[attention.out.weight].CopyFrom(numpy_helper.from_array(_in_out(weight, attention.out),
                                                                       attention.out.weight))
    sample = data.take(2)
    want = _run(silenced, sample, threads)
    label = ", ".join(f"block {b.index}" for b in packed)
    try:
        got = _run(surgery.finish(), sample, threads)
    except Exception as exc:  # onnxruntime refusing a shape the rewrite left behind
        raise UnsupportedModel(f"removing heads from the packed attention of {label} breaks the graph: "
                               f"{str(exc)[:300]}") from exc
    for expected, actual in zip(want, got, strict=True):
        if expected.dtype.kind != "f":
            continue
        error = float(np.max(np.abs(expected.astype(np.float64) - actual))) if expected.shape == actual.shape \
            else math.inf
        if error > _EXACT * (1.0 + float(np.max(np.abs(expected)))):
            raise UnsupportedModel(f"removing heads from the packed attention of {label} changes what the kept "
                                   f"heads compute (max difference {error:.3g}): a head count was not found")


def _down_input(model: onnx.ModelProto, block: Block) -> str:
    assert block.ffn is not None
    return str(model.graph.node[block.ffn.down.matmul].input[0])


def _block_costs(model: onnx.ModelProto, blocks: list[Block], data: ModelData,
                 reference: list[tuple[str, np.ndarray]],
                 ctx: StepContext) -> np.ndarray:
    costs = []
    for index in range(len(blocks)):
        ctx.progress.cancel.check()
        candidate = onnx.ModelProto()
        candidate.CopyFrom(model)
        surgery = Surgery(candidate)
        surgery.drop_blocks(blocks, [index])
        costs.append(1.0 - _fidelity(reference, _run(surgery.finish(), data, ctx.threads)))
        ctx.progress(0.3 + 0.3 * (index + 1) / len(blocks), f"measuring block {index + 1}/{len(blocks)}")
    return np.array(costs)


def _fidelity(reference: list[tuple[str, np.ndarray]], candidate: list[np.ndarray]) -> float:
    """Top-1 agreement on class scores, else mean cosine, over the first float output (as the report's)."""
    for (name, want), got in zip(reference, candidate, strict=True):
        if want.dtype.kind == "f":
            return compare(want.astype(np.float64), got.astype(np.float64), is_classifier(want, name)).score()[0]
    raise UnsupportedModel("the model has no float output to measure the pruning on")
