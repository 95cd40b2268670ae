"""shardopt in Keras 3's `model.fit` (JAX backend): `optimizer=shardopt.keras.Adam(...)`.

    KERAS_BACKEND=jax python examples/keras3_fit.py [--epochs 4]

The optimizer compiles shardopt's step for the model's trainable variables when Keras builds it and runs it
inside `model.fit`'s jitted train step. The final weights are compared with `keras.optimizers.Adam`'s, and the
model is saved to a `.keras` file and loaded back with its optimizer state.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import argparse  # noqa: E402
import tempfile  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import shardopt  # noqa: E402


def fit(optimizer: keras.optimizers.Optimizer, x: np.ndarray, y: np.ndarray, epochs: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=32, epochs=epochs, shuffle=False, verbose=0)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    epochs = parser.parse_args().epochs
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 8)).astype(np.float32)
    y = np.sin(x[:, :4].sum(1, keepdims=True)).astype(np.float32)

    ours = fit(shardopt.keras.Adam(learning_rate=1e-2, global_clipnorm=1.0), x, y, epochs)
    ref = fit(keras.optimizers.Adam(learning_rate=1e-2, global_clipnorm=1.0), x, y, epochs)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ours.get_weights(), ref.get_weights(), strict=True))
    print(f"model.fit with shardopt.keras.Adam: {int(ours.optimizer.iterations.value)} steps, "
          f"loss {float(ours.evaluate(x, y, verbose=0)):.5f}; max |w - w(keras Adam)| = {diff:.1e}")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        ours.save(path)
        loaded = keras.models.load_model(path)  # shardopt.keras.Adam is registered: no custom_objects needed
    print(f"loaded {type(loaded.optimizer).__module__}.{type(loaded.optimizer).__name__} at step "
          f"{int(loaded.optimizer.iterations.value)} with {len(loaded.optimizer.variables)} optimizer variables")


if __name__ == "__main__":
    main()
