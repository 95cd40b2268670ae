"""`shardopt.as_optax` where flax users train (issue 12, wall 1): `nnx.Optimizer`, a linen `TrainState`,
`optax.chain` with clipping and `optax.MultiSteps`, each for 20+ steps against `optax.adam(1e-3, eps=1e-7)`.

`nnx.Optimizer` calls `tx.init` with an nnx `State` of `Param`s and `tx.update` with a `State` of plain arrays;
the compiled step used to be keyed on the tree's node types and the update failed with "no compiled step".

Tolerance: optax adds eps to sqrt of the bias-corrected nu, Keras/shardopt to sqrt of the raw v (see
tests/test_optax.py::test_close_to_optax_adam): with eps=1e-7 and lr=1e-3 the losses agree to ~1e-5 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import shardopt

nnx = pytest.importorskip("flax.nnx")
STEPS = 25
RTOL = 5e-5  # the documented epsilon difference (tests/test_optax.py)
rng = np.random.default_rng(0)
X = rng.normal(size=(32, 4)).astype(np.float32)
Y = np.sin(X.sum(1, keepdims=True)).astype(np.float32)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def train_nnx(tx, steps=STEPS):
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(X) - Y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(steps)]
    return model, optimizer, np.asarray(losses)


def test_nnx_optimizer_trains_like_optax_adam():
    model, optimizer, losses = train_nnx(shardopt.as_optax(shardopt.Adam(1e-3)))
    _, _, ref = train_nnx(optax.adam(1e-3, eps=1e-7))
    assert int(optimizer.step[...]) == STEPS
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, ref, rtol=RTOL)


def test_nnx_errors_say_what_differs():
    tx = shardopt.as_optax(shardopt.Adam(1e-3))
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    other = nnx.state(nnx.Linear(4, 3, rngs=nnx.Rngs(1)), nnx.Param)
    with pytest.raises(shardopt.StepInputError, match=r"missing \[.*l1/bias.*\].*unexpected \['bias', 'kernel'\]"):
        tx.update(nnx.as_pure(other), optimizer.opt_state, nnx.as_pure(other))


def train_params(tx, params, loss_fn, steps=STEPS):
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return params, np.asarray(losses)


def linen_setup():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(jnp.tanh(nn.Dense(16)(x)))

    net = Net()
    return net, net.init(jax.random.key(0), X)["params"]


def test_linen_train_state():
    from flax.training import train_state

    net, params = linen_setup()

    def run(tx):
        state = train_state.TrainState.create(apply_fn=net.apply, params=params, tx=tx)

        @jax.jit
        def step(state):
            loss, grads = jax.value_and_grad(
                lambda p: jnp.mean((state.apply_fn({"params": p}, X) - Y) ** 2))(state.params)
            return state.apply_gradients(grads=grads), loss

        losses = []
        for _ in range(STEPS):
            state, loss = step(state)
            losses.append(float(loss))
        return state, np.asarray(losses)

    state, losses = run(shardopt.as_optax(shardopt.Adam(1e-3)))
    _, ref = run(optax.adam(1e-3, eps=1e-7))
    assert int(state.step) == STEPS
    np.testing.assert_allclose(losses, ref, rtol=RTOL)


@pytest.mark.parametrize("wrap", ["chain_clip", "multi_steps"])
def test_optax_wrappers(wrap):
    net, params = linen_setup()
    loss_fn = lambda p: jnp.mean((net.apply({"params": p}, X) - Y) ** 2)
    if wrap == "chain_clip":
        make = lambda adam: optax.chain(optax.clip_by_global_norm(1.0), adam)
    else:
        make = lambda adam: optax.MultiSteps(adam, every_k_schedule=2)
    _, losses = train_params(make(shardopt.as_optax(shardopt.Adam(1e-3))), params, loss_fn, steps=2 * STEPS)
    _, ref = train_params(make(optax.adam(1e-3, eps=1e-7)), params, loss_fn, steps=2 * STEPS)
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, ref, rtol=RTOL)


def test_sharded_nnx_model_under_set_mesh():
    """flax's sharding guide: params partitioned on an Explicit-axes mesh, model and optimizer built under
    `jax.set_mesh` (walls 1 and 2 together). The kernel keeps its layout; losses match optax.adam."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("batch", "model"))

    class Sharded(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 16, rngs=rngs,
                                 kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model")),
                                 bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",)))
            self.l2 = nnx.Linear(16, 1, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    def train(tx):
        with jax.set_mesh(mesh):
            model = Sharded(nnx.Rngs(0))
            optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

            @nnx.jit
            def train_step(model, optimizer, x, y):
                loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
                optimizer.update(model, grads)
                return loss

            x, y = jax.device_put(X, P("batch")), jax.device_put(Y, P("batch"))
            losses = [float(train_step(model, optimizer, x, y)) for _ in range(STEPS)]
            return np.asarray(losses), model.l1.kernel[...].sharding.spec

    losses, spec = train(shardopt.as_optax(shardopt.Adam(1e-3)))
    ref, _ = train(optax.adam(1e-3, eps=1e-7))
    assert spec == P(None, "model")
    np.testing.assert_allclose(losses, ref, rtol=RTOL)
