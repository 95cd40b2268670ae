"""shardopt in flax: `nnx.Optimizer` with `shardopt.as_optax`, and a linen `TrainState` / `optax.chain`.

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


def train_nnx(tx: optax.GradientTransformation, x: np.ndarray, y: np.ndarray, steps: int) -> list[float]:
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)  # shardopt compiles its step here

    @nnx.jit
    def train_step(model: MLP, optimizer: nnx.Optimizer) -> jax.Array:
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)  # runs the compiled shardopt step inside this jit
        return loss

    return [float(train_step(model, optimizer)) for _ in range(steps)]


def train_linen(tx: optax.GradientTransformation, x: np.ndarray, y: np.ndarray, steps: int) -> list[float]:
    import flax.linen as nn
    from flax.training import train_state

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(jnp.tanh(nn.Dense(32)(x)))

    net = Net()
    state = train_state.TrainState.create(apply_fn=net.apply, params=net.init(jax.random.key(0), x)["params"], tx=tx)

    @jax.jit
    def train_step(state):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2))(state.params)
        return state.apply_gradients(grads=grads), loss

    losses = []
    for _ in range(steps):
        state, loss = train_step(state)
        losses.append(float(loss))
    return losses


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
          f"max relative difference {max(abs(a - b) / b for a, b in zip(ours, ref, strict=True)):.1e})")

    clipped = optax.chain(optax.clip_by_global_norm(1.0), shardopt.as_optax(shardopt.Adam(1e-3)))
    ours = train_linen(clipped, x, y, steps)
    ref = train_linen(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3, eps=1e-7)), x, y, steps)
    print(f"linen TrainState + optax.chain(clip, shardopt): loss {ours[0]:.5f} -> {ours[-1]:.5f} "
          f"(optax.adam: {ref[-1]:.5f})")


if __name__ == "__main__":
    main()
