"""The user's jit of tests/test_scatter_gradients.py: per-replica gradients inside `shard_map`, reduced over
'batch' by `psum` (the step compiled as usual) or by `psum_scatter` (the step compiled with
`scatter_gradients=True`), then the shardopt step with state sharded over 'batch'. Used by that test in one
process and, through tests/mp_workers/worker.py, in 2 processes x 4 devices (gloo's reduce-scatter).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt

try:  # imported from the tests (tests/ on sys.path) or by worker.py (tests/mp_workers/ on sys.path)
    from mp_workers import scenarios
except ImportError:
    import scenarios

U = shardopt.UNSHARDED
W0 = np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32) * 0.1
B0 = np.random.default_rng(1).standard_normal((64,)).astype(np.float32) * 0.1
X = np.random.default_rng(2).standard_normal((16, 128)).astype(np.float32)


def specs(mesh):
    return {"w": shardopt.VariableSpec((128, 64), "float32", shardopt.Layout([U, "model"], mesh)),
            "b": shardopt.VariableSpec((64,), "float32", shardopt.Layout(["model"], mesh))}


def local_grads(p, x):
    """Per-replica gradients of the local batch (inside shard_map): not yet summed over 'batch'."""
    p = jax.tree.map(lambda a: jax.lax.pcast(a, ("batch",), to="varying"), p)
    return jax.grad(lambda p: jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2))(p)


def train_step(step, mesh, scatter):
    fn = step.as_jax_function()
    pspec = {"w": P(None, "model"), "b": P("model")}
    if scatter:  # reduced and scattered over 'batch' in one collective, laid out like the state
        gspec = {k: step.executable.in_shardings[step.contract.arg_index(f"grad/{k}")].spec for k in pspec}

        def grads(p, x):
            return {k: jax.lax.psum_scatter(g, "batch", scatter_dimension=0, tiled=True)
                    for k, g in local_grads(p, x).items()}
    else:
        gspec = pspec

        def grads(p, x):
            return jax.lax.psum(local_grads(p, x), "batch")

    def train(params, state, x):
        g = jax.shard_map(grads, mesh=mesh, in_specs=(pspec, P("batch", None)), out_specs=gspec)(params, x)
        return fn(params, g, state)
    return jax.jit(train, donate_argnums=(0, 1))


def run(step, mesh, scatter, steps=3):
    train = train_step(step, mesh, scatter)
    params = step.place_params({"w": W0, "b": B0})
    state = step.init(params)
    x = jax.device_put(X, NamedSharding(mesh, P("batch", None)))
    hlo = train.lower(params, state, x).compile().as_text()
    for _ in range(steps):
        params, state = train(params, state, x)
    return jax.tree.map(scenarios.to_numpy, (params, step.state_dict(state))), hlo


def count(kind, text):
    """Ops of `kind` in compiled HLO (a combined all-reduce of a tuple counts once)."""
    return len(re.findall(rf"\s{kind}(-start)?\(", text))


def explicit_mesh():
    return jax.make_mesh((2, 4), ("batch", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)


def in_user_jit(scatter: bool) -> dict[str, np.ndarray]:
    """3 steps of the user's jit; the global params and state_dict, and the collectives of its compiled HLO."""
    mesh = explicit_mesh()
    step = shardopt.Adam(1e-2, mesh=mesh, shard_state_over="batch").compile(specs(mesh), scatter_gradients=scatter)
    (params, state), hlo = run(step, mesh, scatter)
    out = {f"params/{k}": v for k, v in params.items()}
    out.update({f"state/{k}": v for k, v in state.items()})
    out.update({f"collectives/{k}": np.asarray(count(k, hlo)) for k in ("all-reduce", "reduce-scatter")})
    return out


def scattered_in_user_jit(mesh=None):
    return in_user_jit(True)


def reduced_in_user_jit(mesh=None):
    return in_user_jit(False)


SCENARIOS = {"scattered_in_user_jit": scattered_in_user_jit, "reduced_in_user_jit": reduced_in_user_jit}
