# mypy: ignore-errors
# (a script for the child process: onnxscript's ops and Keras' backend functions carry no usable types)
"""A vetted Keras file -> ONNX, run as a child process by `keras_convert` and never imported by the app.

It runs as `python -I keras_export.py ...`: isolated (no PYTHONPATH, no user site, not even the script's folder on
sys.path), so it imports only numpy, torch, onnx's exporter and Keras on its torch backend. Keras loads the file
with safe_mode=True and compile=False after `keras_file.vet` has allowlisted its config. The model is captured by
torch.export with every None axis dynamic, exported with torch's ONNX exporter, and Keras' own predictions on the
check inputs (the export's shapes, and a batch size and lengths the export never saw) are written beside it.

LSTM and GRU run through ops of our own whose ONNX form is onnx's LSTM/GRU: Keras' CPU path is a Python loop
over time steps, which torch.export unrolls at the example's length (pytorch/pytorch#115092).

Exit status 0: `output` and `check` written, a JSON summary on the last stdout line; 3: the model is refused, the
reason on the last stderr line; anything else: a failure.
"""



import argparse
import importlib
import json
import os
import sys
import warnings
from typing import Any

REFUSED = 3
EXPORT_BATCH, EXPORT_LENGTH = 2, 7  # not 1: torch.export fixes axes of size 1
CHECK_BATCH, CHECK_LENGTH = 3, 11  # sizes the export never saw
CHECK_ROWS = 64
MAX_ONNX_BYTES = 1900 * 1024 * 1024


class Refused(Exception):
    pass


def _recurrent_ops() -> tuple[Any, Any]:
    """slimserve::lstm / slimserve::gru with ONNX's semantics; torch.export keeps them whole."""
    import torch

    @torch.library.custom_op("slimserve::lstm", mutates_args=())
    def lstm(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, b: torch.Tensor, h0: torch.Tensor,
             c0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # ONNX LSTM, batch first: gates i, o, f, c; w (4H, I), r (4H, H), b (8H) input then recurrent biases.
        hidden = r.shape[1]
        h, c, steps = h0, c0, []
        for t in range(x.shape[1]):
            z = x[:, t] @ w.T + b[:4 * hidden] + h @ r.T + b[4 * hidden:]
            i, o, f, g = z.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            steps.append(h)
        return torch.stack(steps, 1), h.clone(), c.clone()

    @lstm.register_fake
    def _(x, w, r, b, h0, c0):  # type: ignore[no-untyped-def]
        return x.new_empty(x.shape[0], x.shape[1], r.shape[1]), h0.new_empty(h0.shape), c0.new_empty(c0.shape)

    @torch.library.custom_op("slimserve::gru", mutates_args=())
    def gru(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, b: torch.Tensor,
            h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # ONNX GRU with linear_before_reset (Keras' reset_after): gates z, r, h; b (6H).
        hidden = r.shape[1]
        h, steps = h0, []
        for t in range(x.shape[1]):
            xz, xr, xh = (x[:, t] @ w.T + b[:3 * hidden]).chunk(3, dim=1)
            hz, hr, hh = (h @ r.T + b[3 * hidden:]).chunk(3, dim=1)
            z, reset = torch.sigmoid(xz + hz), torch.sigmoid(xr + hr)
            h = (1 - z) * torch.tanh(xh + reset * hh) + z * h
            steps.append(h)
        return torch.stack(steps, 1), h.clone()

    @gru.register_fake
    def _(x, w, r, b, h0):  # type: ignore[no-untyped-def]
        return x.new_empty(x.shape[0], x.shape[1], r.shape[1]), h0.new_empty(h0.shape)

    return lstm, gru


def _patch_keras_recurrent() -> None:
    """Keras' torch backend lstm/gru -> the ops above (Keras' weight layout reordered for ONNX's)."""
    import torch

    torch_rnn = importlib.import_module("keras.src.backend.torch.rnn")
    backend = importlib.import_module("keras.src.backend")
    from keras.src.backend.torch.core import convert_to_tensor

    lstm_op, gru_op = _recurrent_ops()
    keras_lstm, keras_gru = torch_rnn.lstm, torch_rnn.gru

    def gates(matrix: torch.Tensor, order: tuple[int, ...], count: int) -> torch.Tensor:
        size = matrix.shape[-1] // count
        return torch.cat([matrix[..., k * size:(k + 1) * size] for k in order], dim=-1)

    def lstm(inputs, initial_state_h, initial_state_c, mask, kernel, recurrent_kernel, bias, activation,  # type: ignore[no-untyped-def]
             recurrent_activation, return_sequences=False, go_backwards=False, unroll=False, batch_first=True):
        if mask is not None:  # Keras' own path; its time loop makes the export refuse a dynamic length
            return keras_lstm(inputs, initial_state_h, initial_state_c, mask, kernel, recurrent_kernel, bias,
                              activation, recurrent_activation, return_sequences, go_backwards, unroll, batch_first)
        kernel, recurrent = convert_to_tensor(kernel), convert_to_tensor(recurrent_kernel)
        hidden = recurrent.shape[0]
        x = convert_to_tensor(inputs).to(kernel.dtype)
        if go_backwards:
            x = torch.flip(x, dims=[1])
        order = (0, 3, 1, 2)  # Keras i, f, c, o -> ONNX i, o, f, c
        biases = gates(convert_to_tensor(bias), order, 4) if bias is not None else kernel.new_zeros(4 * hidden)
        y, h, c = lstm_op(x, gates(kernel, order, 4).T, gates(recurrent, order, 4).T,
                          torch.cat([biases, kernel.new_zeros(4 * hidden)]),
                          convert_to_tensor(initial_state_h).to(x.dtype),
                          convert_to_tensor(initial_state_c).to(x.dtype))
        return h, (y if return_sequences else h.unsqueeze(1)), [h, c]

    def gru(inputs, initial_state, mask, kernel, recurrent_kernel, bias, activation, recurrent_activation,  # type: ignore[no-untyped-def]
            return_sequences=False, go_backwards=False, unroll=False, reset_after=True):
        if mask is not None or not reset_after:  # Keras' own path, as for lstm
            return keras_gru(inputs, initial_state, mask, kernel, recurrent_kernel, bias, activation,
                             recurrent_activation, return_sequences, go_backwards, unroll, reset_after)
        kernel, recurrent = convert_to_tensor(kernel), convert_to_tensor(recurrent_kernel)
        hidden = recurrent.shape[0]
        x = convert_to_tensor(inputs).to(kernel.dtype)
        if go_backwards:
            x = torch.flip(x, dims=[1])
        # Keras' gates are z, r, h like ONNX's; its bias is (2, 3H): input row, then recurrent row.
        biases = convert_to_tensor(bias).reshape(-1) if bias is not None else kernel.new_zeros(6 * hidden)
        y, h = gru_op(x, kernel.T, recurrent.T, biases, convert_to_tensor(initial_state).to(x.dtype))
        return h, (y if return_sequences else h.unsqueeze(1)), [h]

    torch_rnn.lstm, backend.lstm = lstm, lstm
    torch_rnn.gru, backend.gru = gru, gru


def _translations() -> dict[Any, Any]:
    import torch
    from onnxscript import opset18 as op

    def lstm(x, w, r, b, h0, c0):  # type: ignore[no-untyped-def]
        y, yh, yc = op.LSTM(op.Transpose(x, perm=[1, 0, 2]), op.Unsqueeze(w, [0]), op.Unsqueeze(r, [0]),
                            op.Unsqueeze(b, [0]), None, op.Unsqueeze(h0, [0]), op.Unsqueeze(c0, [0]),
                            hidden_size=r.shape[1])
        return op.Transpose(op.Squeeze(y, [1]), perm=[1, 0, 2]), op.Squeeze(yh, [0]), op.Squeeze(yc, [0])

    def gru(x, w, r, b, h0):  # type: ignore[no-untyped-def]
        y, yh = op.GRU(op.Transpose(x, perm=[1, 0, 2]), op.Unsqueeze(w, [0]), op.Unsqueeze(r, [0]),
                       op.Unsqueeze(b, [0]), None, op.Unsqueeze(h0, [0]), hidden_size=r.shape[1],
                       linear_before_reset=1)
        return op.Transpose(op.Squeeze(y, [1]), perm=[1, 0, 2]), op.Squeeze(yh, [0])

    return {torch.ops.slimserve.lstm.default: lstm, torch.ops.slimserve.gru.default: gru}


def _feeds(specs: list[dict[str, Any]], samples: dict[str, Any] | None, batch: int, length: int,
           offset: int, rows: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(offset)
    feeds = {}
    for spec in specs:
        if samples is not None and spec["name"] in samples:
            array = samples[spec["name"]]
            feeds[spec["name"]] = array[offset:offset + rows] if len(array) > offset else array[:rows]
            continue
        shape = [batch] + [length if d is None else d for d in spec["shape"][1:]]
        if spec["dtype"].startswith(("int", "uint")):
            feeds[spec["name"]] = rng.integers(0, 2, size=shape).astype(spec["dtype"])
        else:
            feeds[spec["name"]] = rng.standard_normal(shape).astype(spec["dtype"])
    return feeds


def _names(raw: list[Any], prefix: str) -> list[str]:
    names: list[str] = []
    for index, name in enumerate(raw):
        text = str(name) if name else f"{prefix}_{index}"
        names.append(text if text not in names else f"{text}_{index}")
    return names


def convert(source: str, output: str, check: str, samples_path: str | None) -> dict[str, Any]:
    import keras
    import numpy as np
    import torch

    _patch_keras_recurrent()
    try:
        model = keras.saving.load_model(source, compile=False, safe_mode=True)
    except Exception as exc:
        raise Refused(f"Keras could not load the model: {str(exc).splitlines()[0][:300]}") from None
    specs = [{"name": str(t.name), "shape": list(t.shape), "dtype": str(t.dtype)} for t in model.inputs]
    input_names = _names([s["name"] for s in specs], "input")
    outputs = list(model.outputs)
    output_names = _names(list(getattr(model, "output_names", None) or []) or [None] * len(outputs), "output")
    samples = dict(np.load(samples_path, allow_pickle=False)) if samples_path else None

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *xs: torch.Tensor) -> Any:
            result = self.model(list(xs) if len(xs) > 1 else xs[0], training=False)
            if isinstance(result, dict):
                return tuple(result[name] for name in output_names)
            return tuple(result) if isinstance(result, (list, tuple)) else result

    example = _feeds(specs, samples, EXPORT_BATCH, EXPORT_LENGTH, 0, EXPORT_BATCH)
    args = tuple(torch.from_numpy(np.ascontiguousarray(example[s["name"]])) for s in specs)
    dynamic = tuple({axis: torch.export.Dim.AUTO for axis, d in enumerate(s["shape"]) if d is None} for s in specs)
    wrapper = Wrapper().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(wrapper, args, dynamic_shapes=(dynamic,), strict=False)
        except Exception as exc:
            raise Refused(f"torch.export could not capture the Keras model: {str(exc).splitlines()[0][:300]}") \
                from None
        dynamic_axes = _dynamic_axes(program, specs, input_names)
        onnx_program = torch.onnx.export(program, dynamo=True, input_names=input_names, output_names=output_names,
                                         custom_translation_table=_translations(), optimize=True, verbose=False)
    onnx_program.save(output)
    if os.path.getsize(output) > MAX_ONNX_BYTES:
        raise Refused("the converted model is over 1.9 GB, which a single ONNX file cannot hold")
    cases = {"export": example, "unseen": _feeds(specs, samples, CHECK_BATCH, CHECK_LENGTH, EXPORT_BATCH, CHECK_ROWS)}
    arrays: dict[str, Any] = {}
    for case, feeds in cases.items():
        predicted = model.predict([feeds[s["name"]] for s in specs] if len(specs) > 1 else feeds[specs[0]["name"]],
                                  verbose=0)
        if isinstance(predicted, dict):
            predicted = [predicted[name] for name in output_names]
        predicted = predicted if isinstance(predicted, (list, tuple)) else [predicted]
        for spec, name in zip(specs, input_names, strict=True):
            arrays[f"{case}.in.{name}"] = feeds[spec["name"]]
        for name, value in zip(output_names, predicted, strict=True):
            arrays[f"{case}.out.{name}"] = np.asarray(value)
    np.savez(check, **arrays)
    return {"inputs": input_names, "outputs": output_names, "dynamic_axes": dynamic_axes,
            "keras_version": keras.__version__, "cases": list(cases)}


def _dynamic_axes(program: Any, specs: list[dict[str, Any]], names: list[str]) -> dict[str, list[int]]:
    """The axes that stayed symbolic; a None axis of the Keras model that the export fixed is refused."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    found: dict[str, list[int]] = {}
    for spec, name, user in zip(specs, names, program.graph_signature.user_inputs, strict=True):
        shape = placeholders[user].meta["val"].shape
        symbolic = [axis for axis, d in enumerate(shape) if not isinstance(d, int)]
        fixed = [axis for axis, d in enumerate(spec["shape"]) if d is None and axis not in symbolic]
        if fixed:
            raise Refused(f"input {name!r}: axis {fixed[0]} is None in the Keras model but the export fixed it "
                          f"at {shape[fixed[0]]} (a layer reads that size as a constant)")
        found[name] = symbolic
    return found


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--check", required=True)
    parser.add_argument("--samples")
    options = parser.parse_args()
    try:
        summary = convert(options.source, options.output, options.check, options.samples)
    except Refused as exc:
        print(str(exc), file=sys.stderr)  # noqa: T201 - the parent reads the reason from stderr
        return REFUSED
    print(json.dumps(summary))  # noqa: T201 - the parent reads the summary from stdout
    return 0


if __name__ == "__main__":
    sys.exit(main())
