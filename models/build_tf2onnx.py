"""Write `models/tf2onnx_cnn.onnx` with the real tf2onnx exporter, for the compression tests.

TensorFlow may not live in SlimServe's environment, so this script runs in a virtualenv of its own and its
output is committed:

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu tf2onnx onnxruntime
    /tmp/tfenv/bin/python models/build_tf2onnx.py

The model is what a Keras user writes: Conv2D + BatchNormalization + ReLU blocks in NHWC with a residual
Add, global pooling and Dense layers, seeded random weights, BatchNorm statistics that are not the identity.
tf2onnx writes it the way it writes every Keras model: NHWC inputs with Transposes around the convolutions,
BatchNorm folded into the Conv weights, and `unk__` names for the dynamic batch axis.
"""

# ruff: noqa: T201  -- a CLI build script: printing is its interface

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent
SAMPLES = 48  # checked against TensorFlow here; the tests draw their own inputs (random images compress badly)


def build() -> object:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    image = tf.keras.Input((32, 32, 3), name="image")
    x = layers.Conv2D(16, 3, padding="same", use_bias=False)(image)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    y = layers.Conv2D(16, 3, padding="same")(x)
    y = layers.BatchNormalization()(y)
    x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(32, activation="relu")(x)
    logits = layers.Dense(10, name="logits")(x)
    model = tf.keras.Model(image, logits)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            rng = np.random.default_rng(len(gamma))
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.uniform(-0.2, 0.2, beta.shape),
                               rng.uniform(-0.5, 0.5, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
    return model


def main() -> int:
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx

    model = build()
    signature = (tf.TensorSpec((None, 32, 32, 3), tf.float32, name="image"),)

    @tf.function(input_signature=signature)
    def serve(image: tf.Tensor) -> tf.Tensor:
        return model(image, training=False)

    path = OUT / "tf2onnx_cnn.onnx"
    tf2onnx.convert.from_function(serve, input_signature=signature, opset=13, output_path=str(path))
    samples = np.random.default_rng(0).standard_normal((SAMPLES, 32, 32, 3)).astype(np.float32)
    expected = model(samples, training=False).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: samples})[0]
    error = float(np.max(np.abs(expected - got)))
    assert error < 1e-4, f"onnxruntime differs from TensorFlow by {error}"
    print(f"{path.name}: {path.stat().st_size / 1024:.0f} KiB, max abs error against TensorFlow {error:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
