"""Keras models as users save them, built by Keras itself (torch backend) in a child process, with Keras' answers.

Run as a script: `python tests/keras_files.py OUT` writes, for each model, `<name>.keras` (and `cnn.h5`) and
`<name>.expected.npz` (inputs at a batch size and sequence length no export uses, and Keras' predictions), plus
`lambda.keras`, whose Lambda layer writes the file `<OUT>/lambda-ran` whenever its code runs.
"""

import os
import sys
from pathlib import Path

os.environ["KERAS_BACKEND"] = "torch"

BUILD_TIMEOUT_SECONDS = 600


def build(out: Path) -> None:
    import keras
    import numpy as np
    from keras import layers

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(1)
    cnn = keras.Sequential([
        keras.Input((8, 8, 1), name="image"), layers.Conv2D(8, 3, padding="same"), layers.BatchNormalization(),
        layers.ReLU(), layers.MaxPooling2D(), layers.Dropout(0.3), layers.Flatten(),
        layers.Dense(10, activation="softmax")])
    images = rng.standard_normal((64, 8, 8, 1)).astype(np.float32)
    # A few steps of training so BatchNormalization's moving statistics are no longer 0 and 1.
    cnn.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    cnn.fit(images, rng.integers(0, 10, 64), epochs=2, batch_size=16, verbose=0)
    cnn.save(out / "cnn.keras")
    cnn.save(out / "cnn.h5")
    np.savez(out / "cnn.expected.npz", image=images[:13], output=cnn.predict(images[:13], verbose=0))

    a, b = keras.Input((4,), name="numbers"), keras.Input((3,), name="flags")
    joined = layers.Concatenate()([layers.Dense(5, activation="relu")(a), b])
    two = keras.Model([a, b], layers.Dense(2, name="score")(joined))
    two.save(out / "two.keras")
    x_a, x_b = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((5, 3)).astype(np.float32)
    np.savez(out / "two.expected.npz", numbers=x_a, flags=x_b, output=two.predict([x_a, x_b], verbose=0))

    sequence = keras.Input((None, 6), name="sequence")
    hidden = layers.LSTM(7, return_sequences=True)(sequence)
    hidden = layers.GRU(5, go_backwards=True)(hidden)
    rnn = keras.Model(sequence, layers.Dense(3)(hidden))
    rnn.save(out / "rnn.keras")
    steps = rng.standard_normal((4, 23, 6)).astype(np.float32)  # 23 steps: the export sees 7
    np.savez(out / "rnn.expected.npz", sequence=steps, output=rnn.predict(steps, verbose=0))

    marker = str(out / "lambda-ran")

    def leaves_a_marker(x):  # type: ignore[no-untyped-def]
        with open(marker, "w") as handle:
            handle.write("ran")
        return x

    hostile = keras.Sequential([keras.Input((4,)), layers.Lambda(leaves_a_marker), layers.Dense(2)])
    hostile.save(out / "lambda.keras")
    os.remove(marker)  # building the model called it once; from here on the file shows any later run


def build_in_child(out: Path) -> dict[str, Path]:
    import subprocess

    environment = {**os.environ, "KERAS_BACKEND": "torch", "KERAS_HOME": str(out / "keras-home")}
    subprocess.run([sys.executable, __file__, str(out)], check=True, env=environment,
                   timeout=BUILD_TIMEOUT_SECONDS, capture_output=True)
    return {path.name: path for path in out.iterdir() if path.is_file()}


if __name__ == "__main__":
    build(Path(sys.argv[1]))
