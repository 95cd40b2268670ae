"""`shardopt.from_optax(tx)`: optax's own update compiled through shardopt's passes, against jitted optax.

One table of transformations, each run 12 steps on the 2x4 mesh (a variable sharded on its minor dim, one on its
major dim and two small replicated ones, which pack), through `compile()` and through `apply_gradients`. Where
shardopt runs the same operations as optax the results are bitwise optax's; where a pass reorders a sum (the
global norm after fuse-clipping) or XLA compiles the sharded step's math differently, within 1e-6 relative.
"""

import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import shardopt
from shardopt import UNSHARDED, Layout, VariableSpec

STEPS = 12
SHAPES = {"w": (8, 16), "p": (16, 4), "b": (16,), "c": (16,)}
LAYOUTS = {"w": [UNSHARDED, "model"], "p": ["model", UNSHARDED], "b": None, "c": None}


def _cases():
    """(transformation factory, exact, extra params): exact means bitwise optax."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=3, decay_steps=STEPS)
    return {
        "adam": (lambda: optax.adam(1e-2), True, {}),
        "adamw": (lambda: optax.adamw(1e-2, weight_decay=0.1), True, {}),
        "lion": (lambda: optax.lion(1e-3), True, {}),
        "sgd_nesterov": (lambda: optax.sgd(1e-2, momentum=0.9, nesterov=True), True, {}),
        "clip_adam": (lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)), False, {}),
        "warmup_cosine": (lambda: optax.adamw(schedule), True, {}),
        # a (128, 128) variable is factored (v_row, v_col: optimizer-level state), the small ones are not (v: slot)
        "adafactor": (lambda: optax.adafactor(1e-2), False, {"f": ((128, 128), ["model", UNSHARDED])}),
        "rmsprop_centered": (lambda: optax.rmsprop(1e-2, centered=True, momentum=0.9), False, {}),
    }


CASES = _cases()


def _shapes(extra):
    shapes = {k: (s, LAYOUTS[k]) for k, s in SHAPES.items()}
    shapes.update(extra)
    return shapes


def _data(shapes, seed=0):
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s).astype(np.float32) for k, (s, _) in shapes.items()}
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, (s, _) in shapes.items()} for _ in range(STEPS)]
    return params, grads


def _optax_reference(tx, params, grads):
    """The usual jitted optax step, one device: final params and state."""
    state = tx.init(jax.tree.map(jnp.asarray, params))

    @jax.jit
    def step(p, g, s):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    p = jax.tree.map(jnp.asarray, params)
    for g in grads:
        p, state = step(p, g, state)
    return p, state


def _check(got, want, exact, what):
    got, want = np.asarray(got), np.asarray(want)
    if exact:
        assert np.array_equal(got, want), f"{what}: max |diff| {np.max(np.abs(got - want))}"
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=what)


def _layout(mesh, layout):
    return None if layout is None else Layout(layout, mesh)


@pytest.mark.parametrize("case", list(CASES))
def test_compile_matches_optax(case, mesh):
    make, exact, extra = CASES[case]
    shapes = _shapes(extra)
    params, grads = _data(shapes)
    want, want_state = _optax_reference(make(), params, grads)
    step = shardopt.from_optax(make(), mesh=mesh).compile(
        {k: VariableSpec(s, "float32", layout=_layout(mesh, lay)) for k, (s, lay) in shapes.items()})
    assert bool(step.packs) == bool(step.slot_names), "with slots, the small replicated variables pack"
    p = step.place_params(params)
    state = step.init(p)
    for g in grads:
        p, state = step(p, g, state)
    for k in shapes:
        _check(p[k], want[k], exact, f"{case}: {k}")
    assert int(state["iterations"]) == STEPS
    counts = [x for path, x in jax.tree_util.tree_flatten_with_path(want_state)[0]
              if getattr(path[-1], "name", None) == "count"]
    assert all(int(c) == STEPS for c in counts)  # optax's count (where it has one) is the step counter
    slots = step.slots(state)
    for path, leaf in jax.tree_util.tree_flatten_with_path(want_state)[0]:
        name = getattr(path[-2], "name", None) if len(path) > 1 else None
        if name in slots and getattr(path[-1], "key", None) in shapes:  # a slot, per parameter
            _check(slots[name][path[-1].key], leaf, exact, f"{case}: slot {name}/{path[-1].key}")


@pytest.mark.parametrize("case", list(CASES))
def test_apply_gradients_matches_optax(case, mesh):
    make, exact, extra = CASES[case]
    shapes = _shapes(extra)
    params, grads = _data(shapes, seed=1)
    want, _ = _optax_reference(make(), params, grads)
    variables = {k: shardopt.Variable(params[k], name=k, layout=_layout(mesh, lay)) for k, (_, lay) in shapes.items()}
    opt = shardopt.from_optax(make(), mesh=mesh)
    for g in grads:
        opt.apply_gradients([(g[k], variables[k]) for k in shapes])
    assert bool(opt.packs) == bool(opt.slot_names())
    for k in shapes:
        _check(variables[k].value, want[k], exact, f"{case}: {k}")
    assert int(opt.iterations.value) == STEPS


def test_adafactor_state_layout(mesh):
    """Factored leaves are optimizer-level state of their own shape (replicated); `v`, of the variable's shape
    for an unfactored variable and a dummy [1] for a factored one, is state too, laid out like its variable where
    it has its shape. Without a factored variable, `v` is a slot (packed like every slot)."""
    opt = shardopt.from_optax(optax.adafactor(1e-2), mesh=mesh)
    step = opt.compile({"f": VariableSpec((128, 128), "float32", layout=Layout(["model", UNSHARDED], mesh)),
                        "w": VariableSpec((8, 16), "float32", layout=Layout([UNSHARDED, "model"], mesh))})
    specs = {a.name: a for a in step.contract.state}
    assert specs["optax/0/v_row/f"].shape == (128,) and specs["optax/0/v_row/f"].layout == (None,)
    assert specs["optax/0/v/f"].shape == (1,)
    assert specs["optax/0/v/w"].shape == (8, 16) and specs["optax/0/v/w"].layout == (None, "model")
    assert not step.slot_names
    small = shardopt.from_optax(optax.adafactor(1e-2), mesh=mesh).compile(
        {"a": VariableSpec((8,), "float32"), "b": VariableSpec((8,), "float32")})
    assert small.slot_names == ("v",) and small.packs


def test_global_norm_clipping_is_fused(mesh):
    """chain(clip_by_global_norm, adam) on 20 small same-shaped variables: fuse-clipping finds optax's sums of
    squares (`x*x + 0*0`) and groups them; the step still matches optax within 1e-6."""
    tx = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2))
    specs = {f"v{i}": VariableSpec((32,), "float32") for i in range(10)}
    specs.update({f"s{i}": VariableSpec((4, 8), "float32", layout=Layout(["batch", UNSHARDED], mesh))
                  for i in range(10)})
    step = shardopt.from_optax(tx, mesh=mesh).compile(specs)
    stats = step.program.pipeline.stage("fuse-clipping").stats
    assert stats["sums_of_squares"] + stats["packed_gradient_norms"] > 0
    assert stats["groups"] > 0 or stats["packed_gradient_norms"] > 0, stats
    assert stats["norm_trees_collapsed"] == 1, stats
    assert step.program.pipeline.stage("fuse-moments").stats["groups"] > 0
    rng = np.random.default_rng(3)
    params = {k: rng.normal(size=s.shape).astype(np.float32) for k, s in specs.items()}
    grads = [{k: rng.normal(size=s.shape).astype(np.float32) for k, s in specs.items()} for _ in range(STEPS)]
    want, _ = _optax_reference(tx, params, grads)
    p = step.place_params(params)
    state = step.init(p)
    for g in grads:
        p, state = step(p, g, state)
    for k in specs:
        _check(p[k], want[k], False, k)


def test_artifact_inspect_and_as_optax(mesh, tmp_path):
    """The compiled optax step saves and loads (no optax needed to run it), inspects, and embeds in JAX."""
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    shapes = _shapes({})
    params, grads = _data(shapes, seed=2)
    want, _ = _optax_reference(tx, params, grads)
    step = shardopt.from_optax(tx, mesh=mesh).compile(
        {k: VariableSpec(s, "float32", layout=_layout(mesh, lay)) for k, (s, lay) in shapes.items()})
    path = tmp_path / "optax_step.shardopt"
    step.save(path)
    loaded = shardopt.load(path, mesh=mesh)
    p = loaded.place_params(params)
    state = loaded.init(p)
    for g in grads:
        p, state = loaded(p, g, state)
    for k in shapes:
        _check(p[k], want[k], False, f"loaded: {k}")
    out = io.StringIO()
    step.inspect(file=out)
    assert "fuse-clipping" in out.getvalue() and "mu" in out.getvalue()

    embedded = shardopt.as_optax(shardopt.from_optax(tx, mesh=mesh))
    p = jax.tree.map(jnp.asarray, params)
    state = embedded.init(p)
    for g in grads:
        updates, state = embedded.update(g, state, p)
        p = optax.apply_updates(p, updates)
    for k in shapes:
        np.testing.assert_allclose(p[k], want[k], rtol=1e-6, atol=1e-7, err_msg=f"as_optax: {k}")


def test_multisteps_keeps_its_own_counts(mesh):
    """optax.MultiSteps advances its inner state every k-th step: the inner count is optimizer-level state, not
    `iterations`, and the result is optax's (within 1e-6: XLA compiles the sharded step's running mean of the
    gradients differently, 1 ulp on some elements)."""
    tx = optax.MultiSteps(optax.adam(1e-2), every_k_schedule=3)
    shapes = _shapes({})
    params, grads = _data(shapes, seed=4)
    want, want_state = _optax_reference(tx, params, grads)
    step = shardopt.from_optax(tx, mesh=mesh).compile(
        {k: VariableSpec(s, "float32", layout=_layout(mesh, lay)) for k, (s, lay) in shapes.items()})
    assert "optax/inner_opt_state/0/count" in {a.name for a in step.contract.state}
    p = step.place_params(params)
    state = step.init(p)
    for g in grads:
        p, state = step(p, g, state)
    for k in shapes:
        _check(p[k], want[k], False, k)
    assert int(state["optax/inner_opt_state/0/count"]) == int(want_state.inner_opt_state[0].count) == STEPS // 3


# ----- what cannot be compiled: clear errors naming the leaf -------------------------------------------------------
def _specs():
    return {"w": VariableSpec((4, 8), "float32"), "b": VariableSpec((8,), "float32")}


def test_host_callback_is_refused_naming_the_leaves(mesh):
    def update(updates, state, params=None):
        scale = jax.pure_callback(lambda: np.float32(0.5), jax.ShapeDtypeStruct((), np.float32))
        return jax.tree.map(lambda u: u * scale, updates), state

    tx = optax.chain(optax.GradientTransformation(lambda p: optax.EmptyState(), update), optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"calls back to Python.*update of (b|w)"):
        shardopt.from_optax(tx, mesh=mesh).compile(_specs())


def test_state_that_changes_shape_is_refused_naming_the_leaf(mesh):
    def update(updates, state, params=None):
        return updates, {"seen": jnp.concatenate([state["seen"], jnp.zeros(1)])}

    tx = optax.GradientTransformation(lambda p: {"seen": jnp.zeros(1)}, update)
    with pytest.raises(ValueError, match=r"state leaf 'seen' changes from float32\[1\] to float32\[2\]"):
        shardopt.from_optax(tx, mesh=mesh).compile(_specs())


def test_state_starting_from_the_params_is_refused_naming_the_leaf(mesh):
    tx = optax.GradientTransformation(lambda p: {"copy": jax.tree.map(lambda x: x * 2, p)},
                                      lambda u, s, p=None: (u, s))
    with pytest.raises(ValueError, match=r"state leaf 'copy/b' does not start at a constant"):
        shardopt.from_optax(tx, mesh=mesh).compile(_specs())


def test_every_variable_needs_a_gradient_and_other_api(mesh):
    opt = shardopt.from_optax(optax.adam(1e-2), mesh=mesh)
    a = shardopt.Variable(np.ones((4,), np.float32), name="a")
    b = shardopt.Variable(np.ones((4,), np.float32), name="b")
    opt.build([a, b])
    with pytest.raises(ValueError, match=r"every variable needs a gradient.*\['b'\]"):
        opt.apply_gradients([(np.ones(4, np.float32), a)])
    assert np.array_equal(a.numpy(), np.ones(4))  # nothing was donated or changed
    opt.apply_gradients([(np.ones(4, np.float32), a), (np.ones(4, np.float32), b)])
    assert opt.get_slot(a, "mu").numpy()[0] == np.float32(0.1)
    with pytest.raises(AttributeError, match="part of the optax transformation"):
        _ = opt.learning_rate
    with pytest.raises(TypeError, match="GradientTransformation"):
        shardopt.from_optax(lambda g: g)
