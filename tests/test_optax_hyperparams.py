"""`shardopt.inject_hyperparams`: the learning rate as optax state a user changes between steps (issue 12).

optax's `inject_hyperparams` rebuilds the transformation at every update with traced values; a compiled shardopt
step takes the learning rate as a runtime scalar input instead, so these tests change it mid-run and check: the
same numbers as the standalone step fed the same learning rates (<= 1e-6, the Sterbenz bound of
tests/test_optax.py), optax's `inject_hyperparams(optax.adam)` within the documented epsilon difference, no
recompile (one compiled step, the user's jit cache unchanged), and clear errors for what cannot work.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import shardopt
from shardopt.core.contract import HYPERPARAMETER

STEPS = 30
CHANGES = {10: 3e-3, 20: 5e-4}  # step -> new learning rate
RTOL = 5e-5  # the documented epsilon difference from optax.adam (tests/test_optax.py::test_close_to_optax_adam)
rng = np.random.default_rng(0)
X = rng.normal(size=(64, 8)).astype(np.float32)
Y = np.sin(X.sum(1, keepdims=True)).astype(np.float32)
PARAMS = {"l1": {"w": (rng.normal(size=(8, 16)) / 3).astype(np.float32), "b": np.zeros(16, np.float32)},
          "l2": {"w": (rng.normal(size=(16, 1)) / 4).astype(np.float32), "b": np.zeros(1, np.float32)}}


def loss_fn(p):
    return jnp.mean((jnp.tanh(X @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"] + p["l2"]["b"] - Y) ** 2)


def set_lr(state, value):
    """What a user writes: a new learning rate in `state.hyperparams`, placed where the old one was."""
    old = state.hyperparams["learning_rate"]
    state.hyperparams["learning_rate"] = jax.device_put(jnp.asarray(value, old.dtype), old.sharding)


def train(tx, params=None, changes=CHANGES, steps=STEPS):
    """A jitted optax loop changing the learning rate at `changes`; returns params, losses, state, jitted step."""
    params = jax.tree.map(jnp.asarray, PARAMS) if params is None else params
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for i in range(steps):
        if i in changes:
            set_lr(state, changes[i])
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return params, np.asarray(losses), state, step


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def run():
    return train(shardopt.inject_hyperparams(shardopt.Adam)(learning_rate=1e-3))


def test_changed_learning_rate_is_the_standalone_step_with_that_learning_rate(run):
    params, losses, state, _ = run
    assert isinstance(state, optax.InjectStatefulHyperparamsState)
    assert float(state.hyperparams["learning_rate"]) == np.float32(5e-4) and int(state.count) == STEPS
    assert float(optax.tree_utils.tree_get(state, "learning_rate")) == np.float32(5e-4)  # exactly one place
    step = shardopt.Adam(1e-3).compile(shardopt.runtime.jax_embed.specs_for(PARAMS))
    p = step.place_params(PARAMS)
    s = step.init(p)
    grad = jax.jit(jax.value_and_grad(loss_fn))
    ref = []
    for i in range(STEPS):
        if i in CHANGES:
            s["learning_rate"] = jnp.float32(CHANGES[i])
        loss, g = grad(p)
        ref.append(float(loss))
        p, s = step(p, g, s)
    np.testing.assert_allclose(losses, ref, rtol=1e-6)
    assert max_diff(params, p) <= 1e-6
    # The learning rate really changed: a run that keeps 1e-3 ends elsewhere.
    _, constant, _, _ = train(shardopt.inject_hyperparams(shardopt.Adam)(learning_rate=1e-3), changes={})
    assert np.max(np.abs(constant[11:] - losses[11:])) > 1e-4


def test_close_to_optax_inject_hyperparams_adam(run):
    _, losses, _, _ = run
    _, ref, ref_state, _ = train(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3, eps=1e-7))
    assert float(ref_state.hyperparams["learning_rate"]) == np.float32(5e-4)
    np.testing.assert_allclose(losses, ref, rtol=RTOL)


def test_changing_the_learning_rate_does_not_recompile(mesh):
    tx = shardopt.inject_hyperparams(shardopt.Adam)(learning_rate=1e-3, mesh=mesh)
    params, _, state, step = train(tx, changes={}, steps=3)
    (fn,) = tx.init.steps.values()  # one compiled shardopt step, with the learning rate as a runtime input
    assert [a.name for a in fn.step.contract.args if a.role == HYPERPARAMETER] == ["learning_rate"]
    traces = step._cache_size()
    for lr in (3e-3, 1e-4, 2e-3):
        set_lr(state, lr)
        params, state, _ = step(params, state)
        assert float(state.hyperparams["learning_rate"]) == np.float32(lr)
    assert step._cache_size() == traces and len(tx.init.steps) == 1


@pytest.mark.parametrize("which", ["optax", "shardopt"])
def test_schedules(which):
    """A schedule is a callable of the step count, as in optax: its value at each step is the step's runtime
    learning rate (optax's linear schedule: optax's own hyperparams value at every step; a shardopt schedule:
    the step that compiles it in, <= 1e-6)."""
    if which == "optax":
        schedule = optax.linear_schedule(1e-3, 1e-2, 20)
        _, losses, state, _ = train(shardopt.inject_hyperparams(shardopt.Adam)(learning_rate=schedule), changes={})
        _, ref, ref_state, _ = train(optax.inject_hyperparams(optax.adam)(learning_rate=schedule, eps=1e-7),
                                     changes={})
        assert float(state.hyperparams["learning_rate"]) == float(ref_state.hyperparams["learning_rate"])
        np.testing.assert_allclose(losses, ref, rtol=RTOL)
    else:
        schedule = shardopt.schedules.ExponentialDecay(1e-2, 5, 0.5)
        params, losses, state, _ = train(shardopt.inject_hyperparams(shardopt.Adam)(learning_rate=schedule),
                                         changes={})
        ref_params, ref, _, _ = train(shardopt.as_optax(shardopt.Adam(schedule)), changes={})
        assert float(state.hyperparams["learning_rate"]) == pytest.approx(float(schedule(STEPS - 1)), rel=1e-6)
        np.testing.assert_allclose(losses, ref, rtol=1e-6)
        assert max_diff(params, ref_params) <= 1e-6


def test_nnx_optimizer_and_linen_train_state():
    """Where flax users change it: `optimizer.opt_state.hyperparams['learning_rate'][...] = x` (nnx) and
    `state.opt_state.hyperparams['learning_rate'] = x` (linen TrainState), as with optax's own."""
    nnx = pytest.importorskip("flax.nnx")
    from flax.training import train_state

    def run_nnx(tx):
        model = nnx.Linear(8, 1, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer):
            loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(X) - Y) ** 2))(model)
            optimizer.update(model, grads)
            return loss

        losses = []
        for i in range(STEPS):
            if i in CHANGES:
                optimizer.opt_state.hyperparams["learning_rate"][...] = CHANGES[i]
            losses.append(float(step(model, optimizer)))
        return np.asarray(losses), float(optimizer.opt_state.hyperparams["learning_rate"][...])

    losses, lr = run_nnx(shardopt.inject_hyperparams(shardopt.Adam)(learning_rate=1e-3))
    ref, ref_lr = run_nnx(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3, eps=1e-7))
    assert lr == ref_lr == np.float32(5e-4)
    np.testing.assert_allclose(losses, ref, rtol=RTOL)

    def run_linen(tx):
        state = train_state.TrainState.create(apply_fn=None, params=jax.tree.map(jnp.asarray, PARAMS), tx=tx)

        @jax.jit
        def step(state):
            loss, grads = jax.value_and_grad(loss_fn)(state.params)
            return state.apply_gradients(grads=grads), loss

        losses = []
        for i in range(STEPS):
            if i in CHANGES:
                state.opt_state.hyperparams["learning_rate"] = jnp.float32(CHANGES[i])
            state, loss = step(state)
            losses.append(float(loss))
        return np.asarray(losses), state

    losses, state = run_linen(shardopt.inject_hyperparams(shardopt.Adam)(learning_rate=1e-3))
    ref, _ = run_linen(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3, eps=1e-7))
    assert int(state.step) == STEPS
    np.testing.assert_allclose(losses, ref, rtol=RTOL)


def test_sharded_params_and_eager_update(mesh):
    kernel = jax.device_put(PARAMS["l1"]["w"], jax.NamedSharding(mesh, jax.P(None, "model")))
    params = {"w": kernel, "b": jnp.asarray(PARAMS["l1"]["b"])}
    tx = shardopt.inject_hyperparams(shardopt.Adam)(learning_rate=1e-3, mesh=mesh)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    state.hyperparams["learning_rate"] = 0.25  # a Python float, eagerly: placed as the step's input
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.25, rtol=1e-3)  # Adam's first step: -lr*sign(g)
    assert updates["w"].sharding.spec == jax.P(None, "model")
    state.hyperparams["learning_rate"] = jnp.float32(0.5)
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert float(state.hyperparams["learning_rate"]) == 0.5 and int(state.inner_state.iterations) == 2


def test_wrapping_as_optax_in_optax_inject_hyperparams_says_what_to_use():
    """optax's wrapper calls the factory again at every update: a new shardopt optimizer with a traced learning
    rate inside jit, a transformation that never saw `init` outside it. Both errors name the replacement."""
    params = {"w": jnp.ones(3)}
    tx = optax.inject_hyperparams(lambda learning_rate: shardopt.as_optax(shardopt.Adam(learning_rate)))(
        learning_rate=1e-3)
    state = tx.init(params)
    with pytest.raises(TypeError, match=r"traced value .*shardopt\.inject_hyperparams\(shardopt\.Adam\)"):
        jax.jit(tx.update)(params, state, params)
    with pytest.raises(RuntimeError, match=r"optax\.inject_hyperparams.*shardopt\.inject_hyperparams"):
        tx.update(params, state, params)


def test_only_the_learning_rate_is_injectable():
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"only \['learning_rate'\] .* `beta_1` is a constant"):
        shardopt.inject_hyperparams(shardopt.Adam)(learning_rate=1e-3, beta_1=optax.constant_schedule(0.9))
    tx = shardopt.inject_hyperparams(shardopt.Adam)(1e-3, 0.8)  # positional arguments bind as Adam's
    state = tx.init(params)
    assert next(iter(tx.init.steps.values())).step.optimizer_config["beta_1"] == 0.8
    state.hyperparams["beta_1"] = jnp.float32(0.95)
    with pytest.raises(ValueError, match=r"state.hyperparams has \['beta_1'\]; only \['learning_rate'\]"):
        tx.update(params, state, params)
    with pytest.raises(TypeError, match="takes a shardopt optimizer class"):
        shardopt.inject_hyperparams(optax.adam(1e-3))
    with pytest.raises(ValueError, match="must be finite"):
        shardopt.inject_hyperparams(shardopt.Adam)(learning_rate=float("nan"))


def test_sharded_nnx_model_under_set_mesh():
    """flax's sharding guide (an Explicit-axes mesh, model and optimizer built under `jax.set_mesh`) with the
    learning rate changed mid-run: the kernel keeps its layout, losses match optax's inject_hyperparams."""
    nnx = pytest.importorskip("flax.nnx")
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("batch", "model"))
    x4, y4 = X[:, :4], np.sin(X[:, :4].sum(1, keepdims=True))

    class Sharded(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 16, rngs=rngs,
                                 kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model")),
                                 bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",)))
            self.l2 = nnx.Linear(16, 1, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    def run(tx):
        with jax.set_mesh(mesh):
            model = Sharded(nnx.Rngs(0))
            optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

            @nnx.jit
            def step(model, optimizer, x, y):
                loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
                optimizer.update(model, grads)
                return loss

            x, y = jax.device_put(x4, P("batch")), jax.device_put(y4, P("batch"))
            losses = []
            for i in range(20):
                if i == 10:
                    optimizer.opt_state.hyperparams["learning_rate"][...] = 3e-3
                losses.append(float(step(model, optimizer, x, y)))
            return np.asarray(losses), model.l1.kernel[...].sharding.spec

    losses, spec = run(shardopt.inject_hyperparams(shardopt.Adam)(learning_rate=1e-3))
    ref, _ = run(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3, eps=1e-7))
    assert spec == P(None, "model")
    np.testing.assert_allclose(losses, ref, rtol=RTOL)
