"""shardopt inside your own jax training loop, two ways:

1. `step.as_jax_function()`: the compiled Adam step as a pure function inside your `jax.jit` train step (with
   donation), on a 2x4 ('batch', 'model') mesh with a model-sharded kernel and batch-sharded data.
2. `shardopt.as_optax(...)`: an optax `GradientTransformation`; an optax loop switches by changing one line.

    python examples/jax_training_loop.py [--steps 100]
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import shardopt  # noqa: E402


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(256, 16)).astype(np.float32)
    y = np.sin(x[:, :4].sum(1, keepdims=True)).astype(np.float32)
    params = {"hidden": {"kernel": (rng.normal(size=(16, 64)) / 4).astype(np.float32),
                         "bias": np.zeros(64, np.float32)},
              "out": {"kernel": (rng.normal(size=(64, 1)) / 8).astype(np.float32),
                      "bias": np.zeros(1, np.float32)}}
    return x, y, params


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return jnp.mean((h @ params["out"]["kernel"] + params["out"]["bias"] - y) ** 2)


def embedded_step(steps: int) -> list[float]:
    """1. The compiled step inside the user's jitted train step, on a 2x4 mesh."""
    mesh = jax.make_mesh((2, 4), ("batch", "model"))
    x, y, params = make_data()
    model = shardopt.Layout([shardopt.UNSHARDED, "model"], mesh)
    specs = {"hidden": {"kernel": shardopt.VariableSpec((16, 64), "float32", model),
                        "bias": shardopt.VariableSpec((64,), "float32", shardopt.Layout(["model"], mesh))},
             "out": {"kernel": shardopt.VariableSpec((64, 1), "float32"),
                     "bias": shardopt.VariableSpec((1,), "float32")}}
    step = shardopt.Adam(1e-3, mesh=mesh).compile(specs)
    apply_adam = step.as_jax_function()  # (params, grads, state) -> (params, state), traceable

    def train_step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        params, state = apply_adam(params, grads, state)  # inlined into this program: one dispatch per step
        return params, state, loss

    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    params = step.place_params(params)
    state = step.init(params)
    # step.mesh is the same devices with Auto axes (what shardopt compiles for); jax.make_mesh's default is
    # Explicit axes, and jax refuses to mix the two in one op, so the data goes on step.mesh too.
    data = NamedSharding(step.mesh, P("batch"))
    x, y = jax.device_put(x, data), jax.device_put(y, data)
    losses = []
    for _ in range(steps):
        params, state, loss = train_step(params, state, x, y)
        losses.append(float(loss))
    print(f"[as_jax_function] 2x4 mesh, hidden/kernel on {params['hidden']['kernel'].sharding.spec}: "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f} after {steps} steps (iterations={int(state['iterations'])})")
    return losses


def optax_loop(tx: optax.GradientTransformation, steps: int) -> np.ndarray:
    """2. A plain optax training loop (one jitted scan); only the line that builds `tx` changes."""
    x, y, params = make_data()
    params = jax.tree.map(jnp.asarray, params)
    opt_state = tx.init(params)  # for shardopt: compiles the step for these params, outside jit

    @jax.jit
    def train(params, opt_state):
        def body(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)  # shardopt needs params
            return (optax.apply_updates(params, updates), opt_state), loss
        return jax.lax.scan(body, (params, opt_state), None, length=steps)

    _, losses = train(params, opt_state)
    return np.asarray(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    embedded_step(args.steps)

    ours = optax_loop(shardopt.as_optax(shardopt.Adam(1e-3)), args.steps)  # was: optax.adam(1e-3)
    theirs = optax_loop(optax.adam(1e-3, eps=1e-7), args.steps)
    print(f"[as_optax]        loss {ours[0]:.4f} -> {ours[-1]:.4f}")
    print(f"[optax.adam]      loss {theirs[0]:.4f} -> {theirs[-1]:.4f}  (max relative loss difference "
          f"{np.max(np.abs(ours - theirs) / theirs):.1e}: optax adds eps to sqrt of the bias-corrected nu, "
          "Keras/shardopt to sqrt of the raw v)")


if __name__ == "__main__":
    main()
