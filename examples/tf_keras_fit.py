"""shardopt in tf-keras's `model.fit`: `optimizer=shardopt.tf_keras.Adam(...)`, the step run by XlaCallModule.

    pip install 'shardopt[tf]'
    python examples/tf_keras_fit.py [--epochs 4]

The optimizer compiles shardopt's step for the model's trainable variables when tf-keras builds it; each
training step is one XlaCallModule over all variables. The weights are compared with `tf_keras.optimizers.Adam`'s,
then the model goes through a `.keras` file and the optimizer through a `tf.train.Checkpoint`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

import shardopt.tf_keras  # noqa: E402


def make_model() -> tf_keras.Model:
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential([tf_keras.layers.Dense(32, activation="tanh"), tf_keras.layers.Dense(1)])
    model.build((None, 8))
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    epochs = parser.parse_args().epochs
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 8)).astype(np.float32)
    y = np.sin(x[:, :4].sum(1, keepdims=True)).astype(np.float32)

    models = {}
    for name, opt in [("shardopt", shardopt.tf_keras.Adam(learning_rate=1e-2)),
                      ("tf-keras", tf_keras.optimizers.Adam(learning_rate=1e-2))]:
        models[name] = model = make_model()
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, batch_size=32, epochs=epochs, shuffle=False, verbose=0)
    ours = models["shardopt"]
    diff = max(float(np.max(np.abs(a - b)))
               for a, b in zip(ours.get_weights(), models["tf-keras"].get_weights(), strict=True))
    print(f"model.fit with shardopt.tf_keras.Adam: {int(ours.optimizer.iterations.numpy())} steps, "
          f"loss {float(ours.evaluate(x, y, verbose=0)):.5f}; max |w - w(tf-keras Adam)| = {diff:.1e}")

    with tempfile.TemporaryDirectory() as tmp:
        ours.save(os.path.join(tmp, "model.keras"))
        loaded = tf_keras.models.load_model(os.path.join(tmp, "model.keras"))
        step = int(loaded.optimizer.iterations.numpy())
        print(f"loaded from .keras: {type(loaded.optimizer).__name__} at step {step}")

        path = tf.train.Checkpoint(model=ours, optimizer=ours.optimizer).save(os.path.join(tmp, "ckpt"))
        fresh_model, fresh = make_model(), shardopt.tf_keras.Adam(learning_rate=1e-2)
        fresh.build(fresh_model.trainable_variables)  # create the state, then restore into it
        tf.train.Checkpoint(model=fresh_model, optimizer=fresh).restore(path).assert_existing_objects_matched()
        print(f"restored from tf.train.Checkpoint at step {int(fresh.iterations.numpy())}")


if __name__ == "__main__":
    main()
