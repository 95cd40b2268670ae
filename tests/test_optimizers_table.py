"""One table drives every optimizer definition against tf-keras 2.21 (as optax's alias_test does).

Each row runs 10 steps on the 2x4 mesh with a sharded dense variable, a replicated dense one, a small replicated
one and a sharded variable with sparse gradients (with duplicate rows), under a set of shared options (clipnorm or
global_clipnorm, weight decay, EMA with overwrite, a schedule), and compares every variable and slot with
plain tf-keras after every step, and the packed step with the unpacked one.

Tolerance: float32, `rtol=1e-6, atol=1e-7` against tf-keras, for every row but Ftrl. What is not bitwise comes
from XLA and TF rounding the same expression differently by an ulp: XLA's algebraic simplifier turns
`x / broadcast(scalar)` into `x * broadcast(1/scalar)` (wrong in the last bit for ~15% of elements), TF's Eigen
`pow` is not correctly rounded, and the norm's summation order under clipping differs; `atol` covers values that
cross zero. Ftrl gets `rtol=1e-5, atol=2e-6`: TF's `tf.pow(g, 2)` differs from `g*g` in ~8% of elements (measured), and
`linear = grad - (sqrt(n') - sqrt(n)) / lr * var` cancels, which turns those ulps into ~3e-5 relative (~2e-7
absolute) on a few elements; with `learning_rate_power=-0.7` both pows are inexact and `linear` grows to ~2,
where 10 steps leave ~2.4e-6 relative.
Adafactor gets `atol=5e-7`: each step moves every element by `max(epsilon_2, rms(var)) * rho_t * u_hat`, two
whole-tensor means (rms of the variable and of the update) whose summation order differs between XLA and TF's
Eigen, so ulps of the tensor's scale (~1) land on elements near zero: measured at most 4.8e-7 absolute (below
3e-7 of the tensor's largest value), 1e-4 relative on an element crossing zero.
Packed vs unpacked: bitwise for every row (the findings behind it are in test_packing_numerics.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
import pytest

import shardopt
from shardopt import Layout

STEPS = 10
TOL = dict(rtol=1e-6, atol=1e-7)
TOL_BY_CLASS = {"Ftrl": dict(rtol=1e-5, atol=2e-6), "Adafactor": dict(rtol=1e-6, atol=5e-7)}
VARIABLES = (  # name, shape, layout (None: replicated), sparse rows (None: dense gradient)
    ("a", (8, 4), ("batch", "model"), None),
    ("b", (12,), None, None),
    ("d", (3,), None, None),
    ("e", (16, 8), ("batch", "model"), (3, 0, 3, 9, 15)),
)
# For definitions whose slots depend on the variable's rank (Adafactor's factored r and c): a replicated matrix,
# a rank-3 variable sharded on its last two dims (r keeps [None, batch], c [None, model]) and a scalar.
RANKS = (("f", (6, 5), None, None), ("g", (2, 4, 8), (None, "batch", "model"), None), ("s", (), None, None))


@dataclasses.dataclass(frozen=True)
class Row:
    cls: str                     # the class name in shardopt and in tf_keras.optimizers
    args: tuple[tuple[str, Any], ...]
    schedule: bool = False       # ExponentialDecay(learning_rate, 3, 0.5) instead of a constant
    ranks: bool = False          # also the RANKS variables

    @property
    def variables(self) -> tuple[tuple[Any, ...], ...]:
        return VARIABLES + RANKS if self.ranks else VARIABLES

    @property
    def id(self) -> str:
        shown = ",".join(f"{k}={v}" for k, v in self.args)
        return f"{self.cls}({shown}{',schedule' if self.schedule else ''})"


def _row(cls: str, schedule: bool = False, ranks: bool = False, **args: Any) -> Row:
    return Row(cls, tuple(sorted(args.items())), schedule, ranks)


CLIP = dict(clipnorm=1.0)
GLOBAL = dict(global_clipnorm=1.5)
EMA = dict(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=4)
WD = dict(weight_decay=0.05)

_OPTIMIZERS_UNDER_TEST = [
    _row("SGD", learning_rate=0.1, **CLIP),
    _row("SGD", learning_rate=0.1, momentum=0.9, **GLOBAL, **WD),
    _row("SGD", learning_rate=0.1, momentum=0.9, nesterov=True, schedule=True, **EMA),
    _row("Adam", learning_rate=0.05, amsgrad=True, **GLOBAL, **EMA),
    _row("Adam", learning_rate=0.05, **CLIP, **WD),
    _row("AdamW", learning_rate=0.05, **CLIP),
    _row("AdamW", learning_rate=0.05, weight_decay=0.1, amsgrad=True, schedule=True),
    _row("RMSprop", learning_rate=0.01, **CLIP, **WD),
    _row("RMSprop", learning_rate=0.01, momentum=0.8, centered=True, **GLOBAL, **EMA),
    _row("RMSprop", learning_rate=0.01, momentum=0.5, centered=True, schedule=True),
    _row("Adagrad", learning_rate=0.1, initial_accumulator_value=0.2, **CLIP, **EMA),
    _row("Adagrad", learning_rate=0.1, schedule=True, **WD),
    _row("Adadelta", learning_rate=1.0, rho=0.9, **GLOBAL, **WD),
    _row("Adadelta", learning_rate=1.0, schedule=True, **EMA),
    _row("Adamax", learning_rate=0.05, **CLIP, **EMA),
    _row("Adamax", learning_rate=0.05, beta_2=0.99, schedule=True, **WD),
    _row("Nadam", learning_rate=0.05, **GLOBAL, **EMA),
    _row("Nadam", learning_rate=0.05, beta_1=0.8, schedule=True, **WD),
    _row("Ftrl", learning_rate=0.1, l1_regularization_strength=0.01, l2_regularization_strength=0.02, **CLIP),
    _row("Ftrl", learning_rate=0.1, learning_rate_power=-0.7, l2_shrinkage_regularization_strength=0.03,
         beta=0.5, initial_accumulator_value=0.3, schedule=True, **EMA),
    _row("Lion", learning_rate=0.01, **GLOBAL, **WD),
    _row("Lion", learning_rate=0.01, beta_1=0.95, beta_2=0.98, schedule=True, **EMA),
    _row("Adafactor", learning_rate=0.05, ranks=True, **CLIP, **EMA),
    _row("Adafactor", learning_rate=0.5, beta_2_decay=-0.6, epsilon_2=0.01, clip_threshold=0.5, ranks=True,
         **GLOBAL, **WD),
    _row("Adafactor", learning_rate=0.05, relative_step=False, epsilon_1=1e-20, schedule=True),
]
ROWS = {r.id: r for r in _OPTIMIZERS_UNDER_TEST}


def _inits(variables: tuple[tuple[Any, ...], ...] = VARIABLES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {n: np.asarray(rng.standard_normal(shape), np.float32) for n, shape, _, _ in variables}


@functools.cache
def _gradients(variables: tuple[tuple[Any, ...], ...] = VARIABLES) -> list[dict[str, Any]]:
    rng = np.random.default_rng(11)
    out = []
    for _ in range(STEPS):
        grads: dict[str, Any] = {}
        for n, shape, _, rows in variables:
            if rows is None:
                grads[n] = rng.standard_normal(shape).astype(np.float32)
            else:
                grads[n] = (rng.standard_normal((len(rows), *shape[1:])).astype(np.float32),
                            np.asarray(rows, np.int32))
        out.append(grads)
    return out


def _kwargs(row: Row, schedules: Any) -> dict[str, Any]:
    kwargs = dict(row.args)
    if row.schedule:
        kwargs["learning_rate"] = schedules.ExponentialDecay(kwargs["learning_rate"], 3, 0.5)
    return kwargs


def densified(g: tuple[np.ndarray, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """A sparse gradient as the dense one it stands for (duplicate rows summed)."""
    dense = np.zeros(shape, np.float32)
    np.add.at(dense, g[1], g[0])
    return dense


@functools.cache
def run_shardopt(row_id: str, pack_max_elements: int | None = None, pipeline: tuple[str, ...] | None = None,
                 dense: bool = False) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """Snapshots after every step; with `dense`, sparse gradients are given densified (for Keras 3)."""
    row = ROWS[row_id]
    mesh = jax.make_mesh((2, 4), ("batch", "model"))
    inits = _inits(row.variables)
    variables = {n: shardopt.Variable(inits[n], name=n, layout=None if spec is None else Layout(spec, mesh))
                 for n, _, spec, _ in row.variables}
    opt = getattr(shardopt, row.cls)(mesh=mesh, **_kwargs(row, shardopt.schedules))
    if pack_max_elements is not None:
        opt.pack_max_elements = pack_max_elements
    if pipeline is not None:
        opt.pipeline = pipeline
    snaps = []
    for grads in _gradients(row.variables):
        pairs = []
        for n, g in grads.items():
            if isinstance(g, tuple):
                g = densified(g, variables[n].shape) if dense else shardopt.IndexedSlices(
                    g[0], g[1], dense_shape=variables[n].shape)
            pairs.append((g, variables[n]))
        opt.apply_gradients(pairs)
        snap = {f"var:{n}": v.numpy() for n, v in variables.items()}
        snap.update({v.name: v.numpy() for v in opt.variables if v.name != "iteration"})
        snaps.append(snap)
    return snaps, [v.name for v in opt.variables]  # tf-keras's names, "SGD/m/a" (without ":0")


def run_tf_keras(row: Row, tf: Any, tfk: Any) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    inits = _inits(row.variables)
    variables = {n: tf.Variable(inits[n], name=n) for n, _, _, _ in row.variables}
    opt = getattr(tfk.optimizers, row.cls)(**_kwargs(row, tfk.optimizers.schedules))
    snaps = []
    for grads in _gradients(row.variables):
        pairs = []
        for n, g in grads.items():
            if isinstance(g, tuple):
                g = tf.IndexedSlices(tf.constant(g[0]), tf.constant(g[1]),
                                     dense_shape=tf.constant(variables[n].shape, dtype=tf.int64))
            else:
                g = tf.constant(g)
            pairs.append((g, variables[n]))
        opt.apply_gradients(pairs)
        snap = {f"var:{n}": v.numpy() for n, v in variables.items()}
        names = [v.name.split(":")[0] for v in opt.variables]
        snap.update({n: v.numpy() for n, v in zip(names, opt.variables, strict=True) if n != "iteration"})
        snaps.append(snap)
    return snaps, [v.name.split(":")[0] for v in opt.variables]


def assert_snaps_close(actual: list[dict[str, np.ndarray]], desired: list[dict[str, np.ndarray]],
                       tol: dict[str, float]) -> None:
    for step, (a, d) in enumerate(zip(actual, desired, strict=True), start=1):
        assert sorted(a) == sorted(d), f"step {step}"
        for k in d:
            np.testing.assert_allclose(a[k], d[k], **tol, err_msg=f"{k} after step {step}")


@pytest.fixture(scope="module")
def tfk():
    import tensorflow as tf
    import tf_keras

    return tf, tf_keras


@pytest.mark.slow
@pytest.mark.tf
@pytest.mark.parametrize("row_id", list(ROWS), ids=list(ROWS))
def test_matches_tf_keras(row_id, tfk):
    tf, tf_keras = tfk
    want, want_names = run_tf_keras(ROWS[row_id], tf, tf_keras)
    got, got_names = run_shardopt(row_id)
    assert got_names == want_names  # `variables` in tf-keras's order, slots under tf-keras's names
    assert_snaps_close(got, want, TOL_BY_CLASS.get(ROWS[row_id].cls, TOL))


@pytest.mark.slow
@pytest.mark.parametrize("row_id", list(ROWS), ids=list(ROWS))
def test_packed_equals_unpacked(row_id):
    """Bitwise, for every row, with the default pipeline (fuse-moments on): see test_packing_numerics.py. Except
    where a pack kernel takes a global clip norm (SGD/Adam without EMA): the pack's norm is summed in the fixed
    order of passes/fixed_order_norm.py, the loose tensors' by XLA's reduce (pinned in test_packing_numerics.py)."""
    packed, _ = run_shardopt(row_id)
    unpacked, _ = run_shardopt(row_id, pack_max_elements=0)
    row = ROWS[row_id]
    args = dict(row.args)
    if row.cls in PACK_KERNEL_CLASSES and "global_clipnorm" in args and not args.get("use_ema"):
        assert_snaps_close(packed, unpacked, dict(rtol=1e-5, atol=1e-7))
        return
    assert_snaps_close(packed, unpacked, dict(rtol=0, atol=0))


PACK_KERNEL_CLASSES = {"SGD", "Adam", "AdamW"}  # shardopt_{sgd,adam}_pack_update (passes/kernel_lowerings.py)


@pytest.mark.tf
@pytest.mark.parametrize("cls", sorted({r.cls for r in _OPTIMIZERS_UNDER_TEST}))
def test_config_round_trips_with_tf_keras_keys(cls, tfk):
    _, tf_keras = tfk
    mine = getattr(shardopt, cls)().get_config()
    theirs = getattr(tf_keras.optimizers, cls)().get_config()
    assert sorted(mine) == sorted(theirs)
    for k, v in theirs.items():
        if k != "jit_compile":
            assert mine[k] == pytest.approx(v) if isinstance(v, float) else mine[k] == v, k
    again = getattr(shardopt, cls).from_config(mine).get_config()
    assert again == mine


@pytest.mark.parametrize("cls", ["Nadam", "Adagrad", "Ftrl", "RMSprop"])
def test_functional_step_initialises_state_as_apply_gradients(cls):
    """`compile()`'s `init` starts optimizer-level state (Nadam's u_product = 1) and constant slots (Adagrad's and
    Ftrl's accumulators) where `build` does: 10 functional steps equal 10 `apply_gradients`, bitwise."""
    row = next(r for r in _OPTIMIZERS_UNDER_TEST if r.cls == cls)
    mesh = jax.make_mesh((2, 4), ("batch", "model"))
    inits = {n: v for n, v in _inits().items() if n != "e"}
    layouts = {n: None if spec is None else Layout(spec, mesh) for n, _, spec, _ in VARIABLES}
    variables = {n: shardopt.Variable(inits[n], name=n, layout=layouts[n]) for n in inits}
    opt = getattr(shardopt, cls)(mesh=mesh, **_kwargs(row, shardopt.schedules))
    step = getattr(shardopt, cls)(mesh=mesh, **_kwargs(row, shardopt.schedules)).compile(
        {n: shardopt.VariableSpec(v.shape, v.dtype, layouts[n]) for n, v in inits.items()})
    params = step.place_params(inits)
    state = step.init(params)
    for grads in _gradients():
        dense = {n: g for n, g in grads.items() if n in inits}
        opt.apply_gradients([(g, variables[n]) for n, g in dense.items()])
        params, state = step(params, dense, state)
    for n, v in variables.items():
        np.testing.assert_array_equal(np.asarray(params[n]), v.numpy(), err_msg=n)


@pytest.mark.parametrize("cls", ["Nadam", "Adagrad"])
def test_artifact_keeps_initial_values(cls, tmp_path):
    """A saved step restores u_product = 1 and the accumulator's constant start in a process without the
    definition: the loaded step's `init` equals the compiled one's."""
    mesh = jax.make_mesh((2, 4), ("batch", "model"))
    specs = {"w": shardopt.VariableSpec((8, 4), np.float32, Layout(("batch", "model"), mesh)),
             "b": shardopt.VariableSpec((12,), np.float32)}
    step = getattr(shardopt, cls)(mesh=mesh).compile(specs)
    step.save(tmp_path / "s.shardopt")
    loaded = shardopt.load(tmp_path / "s.shardopt", mesh)
    params = {"w": np.ones((8, 4), np.float32), "b": np.ones(12, np.float32)}
    want, got = step.init(step.place_params(params)), loaded.init(loaded.place_params(params))
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
    if cls == "Nadam":
        assert float(want["u_product"]) == 1.0
