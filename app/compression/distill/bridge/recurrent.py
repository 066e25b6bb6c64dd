"""LSTM, GRU and RNN as torch functions for the training bridge, with ONNX's weight layout and semantics.

ONNX stacks gates as LSTM i,o,f,c and GRU z,r,h (torch uses i,f,g,o and r,z,n), keeps input and recurrence
biases apart, and masks each batch entry past its `sequence_lens`: outputs there are zero and the state stops at
the last valid step. The input projection of every step is one matmul; the recurrence runs step by step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from app.compression.distill.bridge.coverage import Node
from app.compression.distill.bridge.ops import Inputs, Tensor, need, op, optional_input

# state, precomputed input projection of one step, recurrence weights, recurrence bias -> new state
Cell = Callable[[tuple[Tensor, ...], Tensor, Tensor, Tensor, Tensor | None], tuple[Tensor, ...]]


def _lstm_cell(state: tuple[Tensor, ...], projected: Tensor, recurrence: Tensor, bias: Tensor,
               peephole: Tensor | None) -> tuple[Tensor, ...]:
    h, c = state
    i, o, f, g = (projected + h @ recurrence.t() + bias).chunk(4, dim=-1)
    if peephole is not None:
        pi, po, pf = peephole.chunk(3)
        i, f = i + pi * c, f + pf * c
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    if peephole is not None:
        o = o + po * c
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_cell(linear_before_reset: bool) -> Cell:
    def cell(state: tuple[Tensor, ...], projected: Tensor, recurrence: Tensor, bias: Tensor,
             _peephole: Tensor | None) -> tuple[Tensor, ...]:
        (h,) = state
        xz, xr, xh = projected.chunk(3, dim=-1)
        rz, rr, rh = recurrence.chunk(3, dim=0)
        bz, br, bh = bias.chunk(3)
        z = torch.sigmoid(xz + h @ rz.t() + bz)
        r = torch.sigmoid(xr + h @ rr.t() + br)
        candidate = torch.tanh(xh + r * (h @ rh.t() + bh)) if linear_before_reset \
            else torch.tanh(xh + (r * h) @ rh.t() + bh)
        return ((1 - z) * candidate + z * h,)

    return cell


def _rnn_cell(state: tuple[Tensor, ...], projected: Tensor, recurrence: Tensor, bias: Tensor,
              _peephole: Tensor | None) -> tuple[Tensor, ...]:
    return (torch.tanh(projected + state[0] @ recurrence.t() + bias),)


_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


@op("LSTM", "GRU", "RNN")
def _recurrent(node: Node, xs: Inputs) -> list[Tensor]:
    x, weights, recurrence = need(xs[0]), need(xs[1]), need(xs[2])
    if node.attr("layout", 0):
        x = x.transpose(0, 1)  # [batch, seq, in] -> [seq, batch, in]
    steps, batch, _ = x.shape
    hidden, gates = int(node.attr("hidden_size", recurrence.shape[-1])), _GATES[node.op_type]
    directions = weights.shape[0]
    bias = optional_input(xs, 3)
    lengths = optional_input(xs, 4)
    lengths = lengths.long() if lengths is not None else torch.full((batch,), steps, dtype=torch.long)
    initial = [optional_input(xs, 5)] + ([optional_input(xs, 6)] if node.op_type == "LSTM" else [])
    peepholes = optional_input(xs, 7) if node.op_type == "LSTM" else None
    cell = _lstm_cell if node.op_type == "LSTM" else _rnn_cell if node.op_type == "RNN" else \
        _gru_cell(bool(node.attr("linear_before_reset", 0)))
    reverse = str(node.attr("direction", "forward")) == "reverse"
    outputs, finals = [], []
    for d in range(directions):
        state = tuple(s[d] if s is not None else x.new_zeros(batch, hidden) for s in initial)
        input_bias, recurrence_bias = (bias[d].chunk(2) if bias is not None else
                                       (x.new_zeros(gates * hidden), x.new_zeros(gates * hidden)))
        projected = x @ weights[d].t() + input_bias  # [seq, batch, gates * hidden]
        if node.op_type == "GRU" and node.attr("linear_before_reset", 0):
            step_bias = recurrence_bias  # applied inside the reset gate for h
        elif node.op_type == "GRU":
            projected = projected + torch.cat([recurrence_bias[:2 * hidden], x.new_zeros(hidden)])
            step_bias = torch.cat([x.new_zeros(2 * hidden), recurrence_bias[2 * hidden:]])
        else:
            projected, step_bias = projected + recurrence_bias, x.new_zeros(gates * hidden)
        peephole = peepholes[d] if peepholes is not None else None
        order = range(steps - 1, -1, -1) if reverse or d == 1 else range(steps)
        ys: list[Tensor] = [x.new_zeros(batch, hidden)] * steps
        for t in order:
            valid = (t < lengths).unsqueeze(-1)
            new = cell(state, projected[t], recurrence[d], step_bias, peephole)
            state = tuple(torch.where(valid, n, s) for n, s in zip(new, state, strict=True))
            ys[t] = torch.where(valid, new[0], torch.zeros_like(new[0]))
        outputs.append(torch.stack(ys))  # [seq, batch, hidden]
        finals.append(state)
    y = torch.stack(outputs, dim=1)  # [seq, dirs, batch, hidden]
    last = [torch.stack([f[i] for f in finals]) for i in range(len(finals[0]))]  # [dirs, batch, hidden]
    if node.attr("layout", 0):
        y, last = y.permute(2, 0, 1, 3), [s.transpose(0, 1) for s in last]
    return [y, *last][:len(node.outputs)]
