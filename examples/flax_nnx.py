"""shardopt in flax nnx: `nnx.Optimizer` with `shardopt.as_optax`, and a learning rate changed between steps
with `shardopt.inject_hyperparams`. (flax linen and optax chains: examples/optax_linen.py.)

    python examples/flax_nnx.py [--steps 50]

`as_optax` compiles the step when `nnx.Optimizer` calls `tx.init` (eagerly, at construction) and runs it inside
`nnx.jit` at each `optimizer.update(model, grads)`. The loss is printed next to `optax.adam(1e-3, eps=1e-7)`'s:
they differ by the documented epsilon placement only (Keras adds eps to sqrt of the uncorrected v).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import shardopt


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(8, 32, rngs=rngs)
        self.out = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(x)))


def train_nnx(tx: optax.GradientTransformation, x: np.ndarray, y: np.ndarray, steps: int,
              lr_changes: dict[int, float] | None = None) -> list[float]:
    """`lr_changes` (step -> learning rate) needs an `inject_hyperparams` transformation."""
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)  # shardopt compiles its step here

    @nnx.jit
    def train_step(model: MLP, optimizer: nnx.Optimizer) -> jax.Array:
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)  # runs the compiled shardopt step inside this jit
        return loss

    losses = []
    for i in range(steps):
        if lr_changes and i in lr_changes:  # optimizer state: assigning it recompiles nothing
            optimizer.opt_state.hyperparams["learning_rate"][...] = lr_changes[i]
        losses.append(float(train_step(model, optimizer)))
    return losses


def max_relative(ours: list[float], ref: list[float]) -> float:
    return max(abs(a - b) / b for a, b in zip(ours, ref, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    steps = parser.parse_args().steps
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 8)).astype(np.float32)
    y = np.sin(x[:, :4].sum(1, keepdims=True)).astype(np.float32)

    ours = train_nnx(shardopt.as_optax(shardopt.Adam(1e-3)), x, y, steps)
    ref = train_nnx(optax.adam(1e-3, eps=1e-7), x, y, steps)
    print(f"nnx.Optimizer, {steps} steps: loss {ours[0]:.5f} -> {ours[-1]:.5f} (optax.adam: {ref[-1]:.5f}, "
          f"max relative difference {max_relative(ours, ref):.1e})")

    changes = {steps // 2: 3e-3}
    ours = train_nnx(shardopt.inject_hyperparams(shardopt.Adam)(learning_rate=1e-3), x, y, steps, changes)
    ref = train_nnx(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3, eps=1e-7), x, y, steps, changes)
    print(f"nnx.Optimizer + inject_hyperparams, learning rate 1e-3 -> 3e-3 at step {steps // 2}: loss "
          f"{ours[-1]:.5f} (optax: {ref[-1]:.5f}, max relative difference {max_relative(ours, ref):.1e})")


if __name__ == "__main__":
    main()
