"""shardopt as an optax transformation: a flax linen `TrainState`, `optax.chain`, `optax.MultiSteps`, and a
learning rate changed between steps with `shardopt.inject_hyperparams`.

    python examples/optax_linen.py [--steps 40]

Each run is printed next to the same run with `optax.adam(1e-3, eps=1e-7)`: they differ by the documented epsilon
placement only (Keras, and so shardopt, adds eps to sqrt of the uncorrected v; optax to the corrected one).
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import shardopt


class Net(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(1)(jnp.tanh(nn.Dense(32)(x)))


def train(tx: optax.GradientTransformation, x: np.ndarray, y: np.ndarray, steps: int,
          lr_changes: dict[int, float] | None = None) -> tuple[list[float], train_state.TrainState]:
    """The usual linen loop; `lr_changes` (step -> learning rate) needs an `inject_hyperparams` transformation."""
    net = Net()
    state = train_state.TrainState.create(apply_fn=net.apply, params=net.init(jax.random.key(0), x)["params"], tx=tx)

    @jax.jit
    def train_step(state: train_state.TrainState) -> tuple[train_state.TrainState, jax.Array]:
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2))(state.params)
        return state.apply_gradients(grads=grads), loss

    losses = []
    for i in range(steps):
        if lr_changes and i in lr_changes:  # the learning rate is optimizer state: change it, nothing recompiles
            state.opt_state.hyperparams["learning_rate"] = jnp.float32(lr_changes[i])
        state, loss = train_step(state)
        losses.append(float(loss))
    return losses, state


def report(name: str, ours: list[float], ref: list[float]) -> None:
    diff = max(abs(a - b) / b for a, b in zip(ours, ref, strict=True))
    print(f"{name}: loss {ours[0]:.5f} -> {ours[-1]:.5f} (optax: {ref[-1]:.5f}, max relative difference {diff:.1e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    steps = parser.parse_args().steps
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 8)).astype(np.float32)
    y = np.sin(x[:, :4].sum(1, keepdims=True)).astype(np.float32)

    ours, state = train(shardopt.as_optax(shardopt.Adam(1e-3)), x, y, steps)
    report(f"linen TrainState, {int(state.step)} steps", ours, train(optax.adam(1e-3, eps=1e-7), x, y, steps)[0])

    clip = lambda adam: optax.chain(optax.clip_by_global_norm(1.0), adam)  # noqa: E731
    report("optax.chain(clip_by_global_norm, shardopt)", train(clip(shardopt.as_optax(shardopt.Adam(1e-3))), x, y,
                                                                steps)[0],
           train(clip(optax.adam(1e-3, eps=1e-7)), x, y, steps)[0])

    every2 = lambda adam: optax.MultiSteps(adam, every_k_schedule=2)  # noqa: E731
    report("optax.MultiSteps(shardopt, every 2)", train(every2(shardopt.as_optax(shardopt.Adam(1e-3))), x, y,
                                                        steps)[0],
           train(every2(optax.adam(1e-3, eps=1e-7)), x, y, steps)[0])

    changes = {steps // 3: 3e-3, 2 * steps // 3: 3e-4}
    tx = shardopt.inject_hyperparams(shardopt.Adam)(learning_rate=1e-3)
    ours, state = train(tx, x, y, steps, changes)
    ref, _ = train(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3, eps=1e-7), x, y, steps, changes)
    report(f"inject_hyperparams, learning rate changed at steps {sorted(changes)}", ours, ref)
    print(f"  learning rate now {float(state.opt_state.hyperparams['learning_rate']):.3g}; compiled steps: "
          f"{len(tx.init.steps)}")


if __name__ == "__main__":
    main()
