"""Keras teachers, converted to ONNX as Keras users do: ``model.export`` to a SavedModel,
then ``python -m tf2onnx.convert --saved-model``.

Run as a script, in a process of its own (TensorFlow and torch are not loaded together
in the test process)::

    python -m tests.worker.engine.keras_teachers OUT

It trains, on 70% of scikit-learn's digits (``random_state`` 0), a channels-last CNN
on (8, 8, 1) images with a softmax output and an MLP on the 64 pixels with a logits
output, and writes ``OUT/cnn.onnx``, ``OUT/mlp.onnx`` and ``OUT/digits.npz``
(``x_train``, ``y_train``, ``x_test``, ``y_test``, pixels scaled to [0, 1]).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _to_onnx(model: Any, path: Path) -> None:
    """The model as tf2onnx converts its SavedModel (tf2onnx's ``from_keras`` does not
    take Keras 3 models)."""
    saved = path.with_suffix(".saved")
    model.export(str(saved), verbose=False)
    convert = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved)]
    subprocess.run(
        [*convert, "--output", str(path), "--opset", "17"],
        check=True,
        capture_output=True,
        timeout=300,
    )


def main(out: Path) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0)
    tf.keras.utils.set_random_seed(0)
    out.mkdir(parents=True, exist_ok=True)

    cnn = tf.keras.Sequential(
        [
            tf.keras.Input((8, 8, 1), name="image"),
            tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            tf.keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            tf.keras.layers.MaxPooling2D(),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(128, activation="relu"),
            tf.keras.layers.Dense(10, activation="softmax"),
        ]
    )
    cnn.compile("adam", "sparse_categorical_crossentropy")
    cnn.fit(x_train.reshape(-1, 8, 8, 1), y_train, epochs=15, batch_size=32, verbose=0)
    _to_onnx(cnn, out / "cnn.onnx")

    mlp = tf.keras.Sequential(
        [
            tf.keras.Input((64,), name="features"),
            tf.keras.layers.Dense(256, activation="relu"),
            tf.keras.layers.Dense(256, activation="relu"),
            tf.keras.layers.Dense(10),
        ]
    )
    mlp.compile("adam", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    mlp.fit(x_train, y_train, epochs=30, batch_size=32, verbose=0)
    _to_onnx(mlp, out / "mlp.onnx")

    np.savez(out / "digits.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
