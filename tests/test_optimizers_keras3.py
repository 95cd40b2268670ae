"""The optimizer table (test_optimizers_table.py) against Keras 3 (`keras.optimizers`, JAX backend), row by row.

Keras 3 15.1 has the same update math as tf-keras 2.21 for every definition (read from both sources: same slots,
same formulas, same clipping, weight decay and schedules), with two kinds of difference:
- semantic: its EMA sets the average to the variable itself at the first step (`momentum = ema_momentum *
  (iterations != 0)`), where tf-keras averages from the initial value, so rows with `use_ema` follow another
  trajectory. Those rows are not compared: their test id says why, and the test checks that the difference is
  still there (if Keras 3 adopts tf-keras's EMA, the test fails and the row should be compared);
- rounding only: Keras 3 writes `x / sqrt(y)` where tf-keras writes `x * rsqrt(y)` (RMSprop, Adafactor),
  `1 / sqrt(t)` for `rsqrt(t)` (Adafactor), and runs each op eagerly (no fusion), so results agree within a few
  float32 ulps (`TOL_KERAS3` below, tighter than tf-keras's).
Keras 3 on JAX has no sparse gradients, so both sides get the densified gradient of the sparse variable.
Variables and every slot (by Keras 3's slot names) are compared after each of the 10 steps.
"""

from __future__ import annotations

import functools
from typing import Any

import keras
import numpy as np
import pytest
from test_optimizers_table import (  # the table and its runners
    ROWS,
    Row,
    _gradients,
    _inits,
    _kwargs,
    densified,
    run_shardopt,
)

# Why a row is not compared with Keras 3 (None: compared). Read from the row's data, never from pytest.skip.
EMA_DIFFERS = "Keras 3's EMA takes the variable itself as the average at step 1; tf-keras averages from the start"


def keras3_differs(row: Row) -> str | None:
    return EMA_DIFFERS if dict(row.args).get("use_ema") else None


# Keras 3's name of each slot (`<variable>_<name>`) where it is not tf-keras's; Adafactor's r and c are named
# after their variable alone in Keras 3, so they are read from its `_r` / `_c` lists.
KERAS3_SLOT = {"m": "momentum", "v": "velocity", "vhat": "velocity_hat", "u": "norm"}
# Keras 3 runs on XLA too, so it agrees more closely than tf-keras: measured at `atol=1e-7`, every compared row
# holds within 2e-7 relative (Adagrad's schedule row is the worst) but Ftrl, which needs 1.8e-6 (the same `pow`
# cancellation as against tf-keras) and so keeps its `atol=2e-6`, and Adafactor, which keeps `atol=5e-7` (its
# whole-tensor means; 9.5e-7 absolute measured on `v`, whose elements reach ~3).
TOL_KERAS3 = dict(rtol=4e-7, atol=1e-7)
TOL_KERAS3_BY_CLASS = {"Ftrl": dict(rtol=4e-7, atol=2e-6), "Adafactor": dict(rtol=4e-7, atol=5e-7)}

CASES = {(f"{rid} vs Keras 3" if keras3_differs(r) is None else f"{rid} differs: {keras3_differs(r)}"): rid
         for rid, r in ROWS.items()}


@functools.cache
def run_keras3(row_id: str) -> list[dict[str, np.ndarray]]:
    """Keras 3's snapshots: `var:<name>`, each optimizer variable by its Keras 3 name, Adafactor's factored
    slots as `r/<name>`, `c/<name>`."""
    row = ROWS[row_id]
    inits = _inits(row.variables)
    variables = {n: keras.Variable(inits[n], name=n) for n, _, _, _ in row.variables}
    opt = getattr(keras.optimizers, row.cls)(**_kwargs(row, keras.optimizers.schedules))
    opt.build(list(variables.values()))
    snaps = []
    for grads in _gradients(row.variables):
        opt.apply_gradients([(densified(g, variables[n].shape) if isinstance(g, tuple) else g, variables[n])
                             for n, g in grads.items()])
        snap = {f"var:{n}": np.asarray(v.value) for n, v in variables.items()}
        snap.update({v.name: np.asarray(v.value) for v in opt.variables})
        for n, var in variables.items():
            if row.cls == "Adafactor" and len(var.shape) >= 2:
                index = opt._get_variable_index(var)
                snap[f"r/{n}"], snap[f"c/{n}"] = np.asarray(opt._r[index].value), np.asarray(opt._c[index].value)
        snaps.append(snap)
    return snaps


def keras3_name(key: str) -> str:
    """The Keras 3 snapshot key of a shardopt one (`Adam/m/a` -> `a_momentum`)."""
    if key.startswith("var:"):
        return key
    _, slot, var = key.split("/", 2)
    return f"{slot}/{var}" if slot in ("r", "c") else f"{var}_{KERAS3_SLOT.get(slot, slot)}"


def mismatches(row: Row, got: list[dict[str, np.ndarray]], want: list[dict[str, np.ndarray]],
               tol: dict[str, Any]) -> list[str]:
    """What differs beyond `tol` (EMA averages left out); raises when Keras 3 lacks a slot shardopt has, except
    SGD's `m` with momentum 0 (Keras 3 keeps none; tf-keras's holds `-lr * g` and the trajectories agree)."""
    out = []
    for step, (g, w) in enumerate(zip(got, want, strict=True), start=1):
        for k in g:
            if "/average/" in k:
                continue
            if keras3_name(k) not in w:
                assert row.cls == "SGD" and not dict(row.args).get("momentum"), f"Keras 3 has no {k}"
                continue
            if not np.allclose(g[k], w[keras3_name(k)], **tol):
                err = np.abs(g[k] - w[keras3_name(k)]).max()
                out.append(f"{k} after step {step}: max abs difference {err:.3g}")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_row_against_keras3(case):
    row_id = CASES[case]
    row = ROWS[row_id]
    got, _ = run_shardopt(row_id, dense=True)
    want = run_keras3(row_id)
    tol = TOL_KERAS3_BY_CLASS.get(row.cls, TOL_KERAS3)
    differs = mismatches(row, got, want, tol)
    if keras3_differs(row) is None:
        assert not differs, differs[:5]
    else:  # the stated difference still holds: a variable leaves the tolerance
        assert any(d.startswith("var:") for d in differs), "Keras 3 now agrees: compare this row"
