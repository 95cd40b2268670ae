"""shardopt inside a TensorFlow training loop: a compiled Adam step applied to a tf-keras model's variables through
XlaCallModule, from a `tf.function(jit_compile=True)` train step; checked against tf-keras's own Adam, then saved
with `tf.saved_model.save`, loaded, and trained on.

    pip install 'shardopt[tf]'
    python examples/tf_training_loop.py [--steps 100] [--artifact adam.shardopt]
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

import shardopt  # noqa: E402
import shardopt.tf  # noqa: E402


def make_model(seed: int = 0) -> tf_keras.Model:
    tf_keras.utils.set_random_seed(seed)
    model = tf_keras.Sequential([tf_keras.layers.Dense(64, activation="tanh"), tf_keras.layers.Dense(1)])
    model.build((None, 16))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--artifact", help="also save the compiled step here and run it from the file")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(256, 16)).astype(np.float32))
    y = tf.constant(np.sin(x.numpy()[:, :4].sum(1, keepdims=True)))
    loss_fn = tf_keras.losses.MeanSquaredError()

    # Compile the step for the model's variables (in model.trainable_variables order), on one device.
    model = make_model()
    step = shardopt.Adam(1e-3).compile(shardopt.tf.variable_specs(model.trainable_variables))
    if args.artifact:
        step.save(args.artifact)
        step = args.artifact  # step_function also takes an artifact path (loaded with shardopt.load)
    opt = shardopt.tf.step_function(step, model.trainable_variables)

    @tf.function(jit_compile=True)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x))
        opt(tape.gradient(loss, model.trainable_variables))  # one XlaCallModule: the whole fused update
        return loss

    # The reference: the same model trained by tf-keras's Adam.
    ref_model = make_model()
    ref_opt = tf_keras.optimizers.Adam(1e-3)

    @tf.function
    def ref_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, ref_model(x))
        ref_opt.apply_gradients(zip(tape.gradient(loss, ref_model.trainable_variables),
                                    ref_model.trainable_variables, strict=True))
        return loss

    ours = np.array([float(train_step(x, y)) for _ in range(args.steps)])
    theirs = np.array([float(ref_step(x, y)) for _ in range(args.steps)])
    weights = max(float(np.max(np.abs(a.numpy() - b.numpy())))
                  for a, b in zip(model.trainable_variables, ref_model.trainable_variables, strict=True))
    print(f"shardopt: loss {ours[0]:.4f} -> {ours[-1]:.4f} after {int(opt.iterations.numpy())} steps")
    print(f"tf-keras: loss {theirs[0]:.4f} -> {theirs[-1]:.4f}; max |loss diff| {np.max(np.abs(ours - theirs)):.1e}, "
          f"max |weight diff| {weights:.1e}")

    # Save the model with the optimizer state, load it (no shardopt needed to run it), keep training.
    root = tf.Module()
    root.model, root.optimizer = model, opt
    root.train_step = tf.function(lambda x, y: train_step(x, y),
                                  input_signature=[tf.TensorSpec(x.shape), tf.TensorSpec(y.shape)])
    with tempfile.TemporaryDirectory() as d:
        tf.saved_model.save(root, d)
        loaded = tf.saved_model.load(d)
        more = [float(loaded.train_step(x, y)) for _ in range(10)]
    print(f"after save/load: iterations {int(loaded.optimizer.iterations.numpy())}, loss {more[0]:.4f} -> "
          f"{more[-1]:.4f}")


if __name__ == "__main__":
    main()
