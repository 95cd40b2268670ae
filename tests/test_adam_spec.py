"""Where tf-keras (the reference) and Keras 3 differ: shardopt against the spec's formulas (§3-§7, as a small numpy
reference below) and against tf-keras itself (plain mode; the `tf` tests).

Each scenario is run once per process by shardopt on the 2x4 mesh (sharded and replicated variables); the numpy
and tf-keras runs replay the same gradients. Snapshots hold every model variable, every optimizer variable (by
name: iteration, average/*, m/*, v/*, vhat/*) and the learning rate, after every step.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any

import jax
import ml_dtypes
import numpy as np
import pytest

import shardopt
from shardopt import UNSHARDED, Layout
from shardopt import schedules as so_schedules

F32_TOL = dict(rtol=2e-5, atol=1e-6)
F64_TOL = dict(rtol=1e-12, atol=1e-15)


# ----- the spec's formulas in numpy -------------------------------------------------------------------------------
class ReferenceAdam:
    """Spec §3-§7 for one optimizer: a step is `step(grads)` with grads {name: array | (values, indices) | None}.

    Arithmetic is in the variable's dtype `dt` (float16/bfloat16: float32, stored rounded once per step, shardopt's
    decision). Python scalars become `dt` directly except where tf-keras casts through float32 (§4: lr, the betas
    in the power terms, weight decay).
    """

    def __init__(self, values: dict[str, np.ndarray], learning_rate: Any = 0.001, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-7, amsgrad: bool = False, weight_decay: float | None = None,
                 clipnorm: float | None = None, clipvalue: float | None = None, global_clipnorm: float | None = None,
                 use_ema: bool = False, ema_momentum: float = 0.99, ema_overwrite_frequency: int | None = None,
                 iterations: int = 0, round_betas_via_float32: bool = True):
        self.vars = {k: np.array(v) for k, v in values.items()}
        self.slots = {k: {s: np.zeros_like(v) for s in (("m", "v", "vhat") if amsgrad else ("m", "v"))}
                      for k, v in self.vars.items()}
        self.avg = {k: v.copy() for k, v in self.vars.items()} if use_ema else {}
        self.schedule = learning_rate if callable(learning_rate) else None
        self.lr = None if self.schedule else np.float32(learning_rate)
        self.b1, self.b2, self.eps, self.amsgrad, self.wd = beta_1, beta_2, epsilon, amsgrad, weight_decay
        self.clipnorm, self.clipvalue, self.global_clipnorm = clipnorm, clipvalue, global_clipnorm
        self.ema_momentum, self.freq = ema_momentum, ema_overwrite_frequency
        self.iterations = iterations
        self.round_betas = round_betas_via_float32

    @staticmethod
    def compute_dtype(dt: np.dtype) -> np.dtype:
        return np.dtype(np.float32) if np.dtype(dt).itemsize < 4 else np.dtype(dt)

    def _clip(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.clipnorm and self.clipnorm > 0:
            out = {}
            for k, x in raw.items():
                c = x.dtype.type(self.clipnorm)
                l2sum = np.sum(x * x)
                l2norm = np.sqrt(l2sum) if l2sum > 0 else l2sum
                out[k] = (x * c) / np.maximum(l2norm, c)
            return out
        if self.global_clipnorm and self.global_clipnorm > 0:
            dt = next(iter(raw.values())).dtype.type
            half = dt(0.5)
            norm = np.sqrt(sum(np.sum(x * x * half) for x in raw.values()) * dt(2))
            c, one = dt(self.global_clipnorm), dt(1)
            scale = c * np.minimum(one / norm, one / c) + (norm - norm)
            return {k: x * scale.astype(x.dtype) for k, x in raw.items()}
        if self.clipvalue and self.clipvalue > 0:
            return {k: np.maximum(np.minimum(x, x.dtype.type(self.clipvalue)), x.dtype.type(-self.clipvalue))
                    for k, x in raw.items()}
        return raw

    def current_lr(self) -> np.float32:
        return np.float32(self.schedule(self.iterations)) if self.schedule else self.lr

    def step(self, grads: dict[str, Any]) -> None:
        lr32 = self.current_lr()
        self.last_lr = lr32
        present = {k: g for k, g in grads.items() if g is not None}
        assert present, "all-None steps raise"
        # clipping too runs in the compute dtype (float32 for half precision)
        raw = {k: (g[0] if isinstance(g, tuple) else g).astype(self.compute_dtype(self.vars[k].dtype))
               for k, g in present.items()}
        clipped = self._clip(raw)
        for k, g in present.items():
            var = self.vars[k]
            dt = var.dtype
            ct = self.compute_dtype(dt)
            cast = ct.type
            if isinstance(g, tuple):  # de-duplicate: duplicate rows are summed (§4)
                dense = np.zeros(var.shape, ct)
                np.add.at(dense, g[1], clipped[k].astype(ct))
            else:
                dense = np.broadcast_to(clipped[k].astype(ct), var.shape)
            x = var.astype(ct)
            lr = cast(lr32)
            if self.wd is not None:
                x = x - (x * cast(np.float32(self.wd))) * lr
            t = cast(self.iterations + 1)
            b1 = cast(np.float32(self.b1)) if self.round_betas else cast(self.b1)
            b2 = cast(np.float32(self.b2)) if self.round_betas else cast(self.b2)
            b1p, b2p = np.power(b1, t), np.power(b2, t)
            alpha = (lr * np.sqrt(cast(1) - b2p)) / (cast(1) - b1p)
            c1, c2 = cast(1 - self.b1), cast(1 - self.b2)
            s = {n: a.astype(ct) for n, a in self.slots[k].items()}
            if isinstance(g, tuple):
                m = s["m"] + (-s["m"] * c1) + dense * c1
                v = s["v"] + (-s["v"] * c2) + np.square(dense) * c2
            else:
                m = s["m"] + (dense - s["m"]) * c1
                v = s["v"] + (np.square(dense) - s["v"]) * c2
            v_use = v
            if self.amsgrad:
                v_use = s["vhat"] = np.maximum(s["vhat"], v)
            s["m"], s["v"] = m, v
            x = x - (m * alpha) / (np.sqrt(v_use) + cast(self.eps))
            if self.avg:
                avg = cast(self.ema_momentum) * self.avg[k].astype(ct) + cast(1 - self.ema_momentum) * x
                if self.freq and (self.iterations + 1) % self.freq == 0:
                    x = avg
                self.avg[k] = avg.astype(dt)
            self.vars[k] = x.astype(dt)
            self.slots[k] = {n: a.astype(dt) for n, a in s.items()}
        self.iterations += 1

    def finalize(self) -> None:
        for k in self.vars:
            if self.avg:
                self.vars[k] = self.avg[k].copy()

    def snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = {f"var:{k}": v for k, v in self.vars.items()}
        for k, slots in self.slots.items():
            snap.update({f"{s}/{k}": a for s, a in slots.items()})
        snap.update({f"average/{k}": a for k, a in self.avg.items()})
        snap["iteration"] = self.iterations
        return snap


# ----- scenarios --------------------------------------------------------------------------------------------------
@dataclass
class Scenario:
    kwargs: dict[str, Any]
    variables: list[tuple[str, tuple[int, ...], Any]]   # (name, shape, layout spec or None)
    steps: int = 10
    dtype: Any = np.float32
    none_at: dict[str, set[int]] = field(default_factory=dict)   # variable -> steps (1-based) with a None grad
    sparse: dict[str, list[int]] = field(default_factory=dict)   # variable -> indices (with duplicates)
    iterations: int | None = None
    finalize: bool = False
    grad_scale: float = 1.0
    x64: bool = False

    def inits(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(7)
        return {n: rng.standard_normal(shape).astype(self.dtype) for n, shape, _ in self.variables}

    def gradients(self) -> list[dict[str, Any]]:
        rng = np.random.default_rng(11)
        steps = []
        for step in range(1, self.steps + 1):
            grads: dict[str, Any] = {}
            for name, shape, _ in self.variables:
                if name in self.sparse:
                    idx = np.asarray(self.sparse[name], np.int32)
                    values = rng.standard_normal((len(idx), *shape[1:])) * self.grad_scale
                    grads[name] = (values.astype(self.dtype), idx)
                else:
                    grads[name] = (rng.standard_normal(shape) * self.grad_scale).astype(self.dtype)
                if step in self.none_at.get(name, ()):
                    grads[name] = None
            steps.append(grads)
        return steps


def _calls_recorder(value: float, after: float) -> Any:
    """A callable learning rate that returns `value` on its first call and `after` on any later one."""
    calls = []

    def lr():
        calls.append(1)
        return value if len(calls) == 1 else after

    lr.calls = calls
    return lr


AB = [("a", (4, 8), ["batch", "model"]), ("b", (6,), None)]
SCENARIOS = {
    # EMA only for vars with a gradient; overwrite at steps 3, 6; c never gets a gradient (finalize: build value).
    "ema": Scenario(dict(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3, learning_rate=0.05),
                    [*AB, ("c", (3,), None)], steps=7, none_at={"b": {2, 3}, "c": set(range(1, 8))}, finalize=True),
    "clipnorm_clipvalue": Scenario(dict(clipnorm=0.5, clipvalue=0.1, learning_rate=0.01), AB),
    "global_clipnorm_clipvalue": Scenario(dict(global_clipnorm=1.0, clipvalue=0.1, learning_rate=0.01), AB),
    "clipnorm0_clipvalue": Scenario(dict(clipnorm=0.0, clipvalue=0.1, learning_rate=0.01), AB),
    "callable_lr": Scenario(dict(learning_rate=None), AB, steps=4),  # learning_rate set per run (a fresh callable)
    "sparse": Scenario(dict(amsgrad=True, learning_rate=0.02),
                       [("rows", (8, 4), ["model", UNSHARDED]), ("grid", (4, 8), ["batch", "model"]),
                        ("emb", (6, 3), None), ("b", (6,), None)],
                       sparse={"rows": [1, 5, 1, 7, 1], "grid": [3, 0, 3], "emb": [2, 2, 4]}),
    "sparse_clipvalue": Scenario(dict(clipvalue=0.5, learning_rate=0.02),
                                 [("rows", (8, 4), ["model", UNSHARDED]), ("emb", (6, 3), None)],
                                 sparse={"rows": [6, 6, 6, 0], "emb": [5, 1, 5]}),
    "none_grads": Scenario(dict(learning_rate=0.05), [*AB, ("c", (2, 4), [UNSHARDED, "model"])], steps=5,
                           none_at={"b": {2, 3}, "a": {4}, "c": {1, 2, 3, 4, 5}}),
    "float64": Scenario(dict(amsgrad=True, weight_decay=0.1, learning_rate=0.01), AB, dtype=np.float64, x64=True),
    "float64_ema_clip": Scenario(dict(global_clipnorm=1.0, use_ema=True, ema_momentum=0.8, ema_overwrite_frequency=4,
                                      learning_rate=0.01), AB, dtype=np.float64, x64=True),
    "bfloat16": Scenario(dict(learning_rate=0.01), AB, steps=5, dtype=ml_dtypes.bfloat16),
    "float16": Scenario(dict(learning_rate=0.01, amsgrad=True), AB, steps=5, dtype=np.float16),
    # a global norm of ~300: its float16 sum of squares would overflow (every gradient NaN); clipped in float32
    "float16_global_clipnorm": Scenario(dict(learning_rate=0.01, global_clipnorm=1.0), AB, steps=3,
                                        dtype=np.float16, grad_scale=50.0),
    # The schedule is read at the pre-increment counter: step k uses schedule(5 + k - 1), bias correction t = 5 + k.
    "schedule_preincrement": Scenario(dict(learning_rate="piecewise"), AB, steps=4, iterations=5),
}


def _lr_arg(sc: Scenario, flavour: str, tfk: Any = None) -> Any:
    lr = sc.kwargs.get("learning_rate", 0.001)
    if lr is None:  # a callable: the numpy reference takes the value it freezes to
        return 0.05 if flavour == "numpy" else _calls_recorder(0.05, 0.5)
    if lr == "piecewise":
        if flavour == "shardopt":
            return so_schedules.PiecewiseConstantDecay([6], [0.05, 0.01])
        if flavour == "tf":
            return tfk.optimizers.schedules.PiecewiseConstantDecay([6], [0.05, 0.01])
        return lambda step: np.float32(0.05) if step <= 6 else np.float32(0.01)
    return lr


def _kwargs(sc: Scenario, flavour: str, tfk: Any = None) -> dict[str, Any]:
    return {**sc.kwargs, "learning_rate": _lr_arg(sc, flavour, tfk)}


@functools.cache
def run_shardopt(key: str) -> tuple[list[dict[str, Any]], Any]:
    sc = SCENARIOS[key]
    mesh = jax.make_mesh((2, 4), ("batch", "model"))
    with jax.enable_x64(sc.x64), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the clip-precedence warning (asserted in its own test)
        inits = sc.inits()
        variables = {n: shardopt.Variable(inits[n], name=n, layout=None if spec is None else Layout(spec, mesh))
                     for n, _, spec in sc.variables}
        kwargs = _kwargs(sc, "shardopt")
        opt = shardopt.Adam(mesh=mesh, **kwargs)
        if sc.iterations is not None:
            opt.iterations = sc.iterations
        snaps = []
        for grads in sc.gradients():
            pairs = []
            for n, g in grads.items():
                if isinstance(g, tuple):
                    g = shardopt.IndexedSlices(g[0], g[1], dense_shape=variables[n].shape)
                pairs.append((g, variables[n]))
            opt.apply_gradients(pairs)
            snap = {f"var:{n}": v.numpy() for n, v in variables.items()}
            snap.update({v.name.removeprefix(f"{opt.name}/"): v.numpy() for v in opt.variables})
            snap["iteration"] = int(snap["iteration"])
            snap["lr"] = np.float32(opt.learning_rate)
            snaps.append(snap)
        if sc.finalize:
            variables["c"].assign(variables["c"].value + 1)  # finalize restores the build-time average
            opt.finalize_variable_values(list(variables.values()))
            snaps.append({f"var:{n}": v.numpy() for n, v in variables.items()})
        return snaps, {"opt": opt, "variables": variables, "lr": kwargs["learning_rate"]}


def run_reference(key: str, **overrides: Any) -> list[dict[str, Any]]:
    sc = SCENARIOS[key]
    kwargs = {**_kwargs(sc, "numpy"), **overrides}
    ref = ReferenceAdam(sc.inits(), iterations=sc.iterations or 0, **kwargs)
    snaps = []
    for grads in sc.gradients():
        ref.step(grads)
        snaps.append({**ref.snapshot(), "lr": ref.last_lr})
    if sc.finalize:
        ref.vars["c"] = ref.vars["c"] + ref.vars["c"].dtype.type(1)
        ref.finalize()
        snaps.append({f"var:{k}": v for k, v in ref.vars.items()})
    return snaps


def run_tf_keras(key: str, tf: Any, tfk: Any) -> tuple[list[dict[str, Any]], Any]:
    sc = SCENARIOS[key]
    inits = sc.inits()
    tf_dtype = tf.bfloat16 if sc.dtype is ml_dtypes.bfloat16 else tf.as_dtype(sc.dtype)
    variables = {n: tf.Variable(_tf_const(tf, inits[n], tf_dtype), name=n) for n, _, _ in sc.variables}
    kwargs = _kwargs(sc, "tf", tfk)
    opt = tfk.optimizers.Adam(**kwargs)
    if sc.iterations is not None:
        opt.iterations = tf.Variable(sc.iterations, dtype=tf.int64, name="iteration")
    snaps = []
    for grads in sc.gradients():
        pairs = []
        for n, g in grads.items():
            if isinstance(g, tuple):
                g = tf.IndexedSlices(_tf_const(tf, g[0], tf_dtype), tf.constant(g[1]),
                                     dense_shape=tf.constant(variables[n].shape, dtype=tf.int64))
            elif g is not None:
                g = _tf_const(tf, g, tf_dtype)
            pairs.append((g, variables[n]))
        opt.apply_gradients(pairs)
        snap = {f"var:{n}": _np(v) for n, v in variables.items()}
        # built inside apply_gradients' name scope, tf-keras names the slots "Adam/m/a:0"
        snap.update({v.name.split(":")[0].removeprefix(f"{opt.name}/"): _np(v) for v in opt.variables})
        # tf-keras's `variables` keeps the counter it created in __init__ even after `iterations` was replaced
        # (stuck at 0 here); shardopt lists the counter it uses. Compare the counter that counts.
        snap["iteration"] = int(opt.iterations.numpy())
        snap["lr"] = np.float32(opt.learning_rate.numpy())
        snaps.append(snap)
    if sc.finalize:
        variables["c"].assign(variables["c"] + 1)
        opt.finalize_variable_values(list(variables.values()))
        snaps.append({f"var:{n}": _np(v) for n, v in variables.items()})
    return snaps, {"opt": opt, "variables": variables, "lr": kwargs["learning_rate"]}


def _tf_const(tf: Any, arr: np.ndarray, dtype: Any) -> Any:
    if dtype == tf.bfloat16:  # exact: bfloat16 values are float32 values
        return tf.cast(tf.constant(arr.astype(np.float32)), tf.bfloat16)
    return tf.constant(arr, dtype=dtype)


def _np(v: Any) -> np.ndarray:
    arr = v.numpy()
    return arr.astype(ml_dtypes.bfloat16) if v.dtype.name == "bfloat16" else arr


def assert_snapshots_close(actual: list[dict[str, Any]], desired: list[dict[str, Any]], tol: dict[str, float],
                           keys_equal: bool = True) -> None:
    assert len(actual) == len(desired)
    for step, (a, d) in enumerate(zip(actual, desired, strict=True), start=1):
        if keys_equal:
            assert sorted(a) == sorted(d), f"step {step}"
        for k in d:
            np.testing.assert_allclose(np.asarray(a[k], np.float64), np.asarray(d[k], np.float64), **tol,
                                       err_msg=f"{k} after step {step}")


def _tol(key: str) -> dict[str, float]:
    sc = SCENARIOS[key]
    if sc.dtype is np.float64:
        return F64_TOL
    if np.dtype(sc.dtype).itemsize < 4:  # a rounding flip is one half-precision ulp
        return dict(rtol=1e-2, atol=1e-3)
    return F32_TOL


@pytest.fixture(scope="module")
def tfk():
    """TensorFlow and tf_keras, imported once per module (slow)."""
    import tensorflow as tf
    import tf_keras

    return tf, tf_keras


# ----- against the spec's formulas --------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(SCENARIOS))
def test_matches_spec_formulas(key):
    snaps, _ = run_shardopt(key)
    assert_snapshots_close(snaps, run_reference(key), _tol(key))


def test_ema_only_for_variables_with_a_gradient_and_overwrite_at_multiples_of_frequency():
    snaps, state = run_shardopt("ema")
    # Steps 3 and 6 (1-based) overwrite a with its average; b had no gradient at step 3: neither averaged nor
    # overwritten, so its average is where step 1 left it.
    for step in (3, 6):
        np.testing.assert_array_equal(snaps[step - 1]["var:a"], snaps[step - 1]["average/a"])
    for step in (1, 2, 4, 5, 7):
        assert not np.array_equal(snaps[step - 1]["var:a"], snaps[step - 1]["average/a"])
    np.testing.assert_array_equal(snaps[2]["average/b"], snaps[0]["average/b"])
    assert not np.array_equal(snaps[2]["var:b"], snaps[2]["average/b"])
    # finalize_variable_values: every var := its average, c (never a gradient) back to its build-time value.
    final, last = snaps[-1], snaps[-2]
    for n in "abc":
        np.testing.assert_array_equal(final[f"var:{n}"], last[f"average/{n}"])
    np.testing.assert_array_equal(final["var:c"], SCENARIOS["ema"].inits()["c"])
    assert state["variables"]["a"].value.sharding.spec == jax.sharding.PartitionSpec("batch", "model")


@pytest.mark.parametrize("kwargs", [dict(clipnorm=0.5, clipvalue=0.1), dict(global_clipnorm=1.0, clipvalue=0.1)])
def test_clipvalue_with_a_norm_clip_warns(kwargs):
    with pytest.warns(UserWarning, match="clipvalue"):
        shardopt.Adam(**kwargs)


def test_clip_precedence_ignores_clipvalue():
    """clipnorm (then global_clipnorm) wins over clipvalue: the runs equal the norm clip alone."""
    for key, alone in (("clipnorm_clipvalue", dict(clipnorm=0.5)),
                       ("global_clipnorm_clipvalue", dict(global_clipnorm=1.0))):
        snaps, _ = run_shardopt(key)
        assert_snapshots_close(snaps, run_reference(key, clipvalue=None, **alone), F32_TOL)
        with pytest.raises(AssertionError):  # and clipvalue alone would have given something else
            assert_snapshots_close(snaps, run_reference(key, clipnorm=None, global_clipnorm=None), F32_TOL)


def test_callable_learning_rate_is_called_once_and_frozen():
    snaps, state = run_shardopt("callable_lr")
    assert len(state["lr"].calls) == 1
    assert all(s["lr"] == np.float32(0.05) for s in snaps)
    assert float(state["opt"].learning_rate) == np.float32(0.05)


def test_none_gradients_leave_variable_and_slots_untouched_and_count_the_step():
    snaps, _ = run_shardopt("none_grads")
    assert [s["iteration"] for s in snaps] == [1, 2, 3, 4, 5]
    for step, name in ((2, "b"), (3, "b"), (4, "a")):
        for k in (f"var:{name}", f"m/{name}", f"v/{name}"):
            np.testing.assert_array_equal(snaps[step - 1][k], snaps[step - 2][k], err_msg=f"{k} at step {step}")
    init_c = SCENARIOS["none_grads"].inits()["c"]
    np.testing.assert_array_equal(snaps[-1]["var:c"], init_c)
    assert not snaps[-1]["m/c"].any() and not snaps[-1]["v/c"].any()


def test_sparse_duplicates_are_summed_into_sharded_and_replicated_variables():
    snaps, state = run_shardopt("sparse")
    assert state["variables"]["rows"].value.sharding.spec == jax.sharding.PartitionSpec("model", None)
    # Rows without an index keep m == 0 after step 1, and the summed duplicate row gives v = (sum g)^2 (1 - b2).
    sc = SCENARIOS["sparse"]
    values, idx = sc.gradients()[0]["rows"]
    m1, v1 = snaps[0]["m/rows"], snaps[0]["v/rows"]
    untouched = sorted(set(range(8)) - set(idx.tolist()))
    assert not m1[untouched].any()
    summed = values[idx == 1].sum(axis=0)
    np.testing.assert_allclose(v1[1], np.square(summed) * np.float32(1 - 0.999), rtol=1e-5)


def test_float64_uses_float32_rounded_betas():
    """§4: the betas enter the power terms rounded to float32; with exact float64 betas the result differs."""
    snaps, state = run_shardopt("float64")
    assert state["variables"]["a"].dtype == np.float64
    assert state["opt"].iterations.value.dtype == np.int64
    with pytest.raises(AssertionError):
        assert_snapshots_close(snaps, run_reference("float64", round_betas_via_float32=False), F64_TOL)


@pytest.mark.parametrize("key", ["bfloat16", "float16", "float16_global_clipnorm"])
def test_half_precision_is_computed_in_float32_and_moves(key):
    snaps, state = run_shardopt(key)
    sc = SCENARIOS[key]
    assert state["variables"]["a"].dtype == np.dtype(sc.dtype)
    # bfloat16(0.999) == 1, so computing in bfloat16 would leave alpha == 0 and the variables where they were.
    for n, init in sc.inits().items():
        assert (snaps[-1][f"var:{n}"] != init).mean() > 0.5, n
        assert np.isfinite(snaps[-1][f"var:{n}"].astype(np.float32)).all(), n
        assert snaps[-1][f"m/{n}"].dtype == np.dtype(sc.dtype)


def test_schedule_at_pre_increment_counter_after_setting_iterations():
    snaps, _ = run_shardopt("schedule_preincrement")
    # step k uses schedule(5 + k - 1): 0.05 for steps 1-2 (counter 5, 6 <= boundary 6), then 0.01
    assert [float(s["lr"]) for s in snaps] == [np.float32(0.05)] * 2 + [np.float32(0.01)] * 2
    assert [s["iteration"] for s in snaps] == [6, 7, 8, 9]


# ----- against tf-keras itself ------------------------------------------------------------------------------------
TF_SCENARIOS = [k for k, sc in SCENARIOS.items() if np.dtype(sc.dtype).itemsize >= 4]


@pytest.mark.tf
@pytest.mark.parametrize("key", TF_SCENARIOS)
def test_matches_tf_keras(key, tfk):
    tf, tf_keras = tfk
    snaps, _ = run_shardopt(key)
    tf_snaps, tf_state = run_tf_keras(key, tf, tf_keras)
    assert_snapshots_close(snaps, tf_snaps, _tol(key))
    if key == "callable_lr":
        assert len(tf_state["lr"].calls) == 1


@pytest.mark.tf
def test_tf_keras_bfloat16_never_moves_but_shardopt_does(tfk):
    """The deliberate difference (spec, decisions): tf-keras computes in bfloat16 where beta_2 rounds to 1."""
    tf, tf_keras = tfk
    tf_snaps, _ = run_tf_keras("bfloat16", tf, tf_keras)
    snaps, _ = run_shardopt("bfloat16")
    inits = SCENARIOS["bfloat16"].inits()
    for n, init in inits.items():
        np.testing.assert_array_equal(tf_snaps[-1][f"var:{n}"], init)
        assert not np.array_equal(snaps[-1][f"var:{n}"], init)
