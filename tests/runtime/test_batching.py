"""The batcher with a real onnxruntime session: texts of different lengths padded into one call, each answer as
if it had run alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from app.runtime.batching import Batcher
from app.runtime.sessions import SessionCache, SessionConfig


def _token_model(path: Path) -> Path:
    """Per token: its id times its mask ([B, S, 1], keeps the sequence axis); per text: the masked sum ([B])."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["input_ids", "attention_mask"], ["kept"]),
         helper.make_node("Cast", ["kept"], ["as_float"], to=TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["as_float", "axis"], ["per_token"]),
         helper.make_node("ReduceSum", ["as_float", "axis"], ["per_text"], keepdims=0)],
        "tokens",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("per_token", TensorProto.FLOAT, ["batch", "sequence", 1]),
         helper.make_tensor_value_info("per_text", TensorProto.FLOAT, ["batch"])],
        [onnx.numpy_helper.from_array(np.array([-1], np.int64), "axis")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _request(length: int, rows: int) -> dict[str, np.ndarray]:
    ids = np.arange(1, length * rows + 1, dtype=np.int64).reshape(rows, length)
    mask = np.ones_like(ids)
    mask[:, -1] = 0  # each request carries some padding of its own already
    return {"input_ids": ids, "attention_mask": mask}


def test_texts_of_different_lengths_share_one_call_and_get_their_own_answers(tmp_path: Path) -> None:
    sessions = SessionCache(SessionConfig(max_concurrent=1))
    loaded = sessions.open("tokens", _token_model(tmp_path / "tokens.onnx"), "tokens", None)
    calls: list[int] = []
    batcher = Batcher(sessions, loaded, max_batch_size=64, max_queue_delay_s=0.02, on_call=calls.append,
                      pad={"input_ids": 0, "attention_mask": 0})
    requests = [_request(5, 2), _request(9, 1), _request(16, 3)]

    async def run_all() -> list[list[np.ndarray]]:
        results = await asyncio.gather(*(batcher.run(r, None, len(r["input_ids"])) for r in requests))
        return [r.arrays for r in results]

    answers = asyncio.run(run_all())
    assert calls == [6]  # one call for all three lengths
    for request, (per_token, per_text) in zip(requests, answers, strict=True):
        alone = loaded.session.run(None, request)
        assert per_token.shape == alone[0].shape  # cut back to the request's own length
        np.testing.assert_array_equal(per_token, alone[0])
        np.testing.assert_array_equal(per_text, alone[1])

    bucketed = Batcher(sessions, loaded, max_batch_size=64, max_queue_delay_s=0.02, on_call=calls.append)
    calls.clear()

    async def run_bucketed() -> None:
        await asyncio.gather(*(bucketed.run(r, None, len(r["input_ids"])) for r in requests))

    asyncio.run(run_bucketed())
    assert sorted(calls) == [1, 2, 3]  # without padding, only equal shapes batch
    sessions.close()
