"""The same optimizer runs, written once, executed on the pytest process's 8 devices (the reference) and by
tests/mp_workers/worker.py in 2 processes x 4 devices. Every scenario returns {name: numpy array} of the
*global* values (gathered across processes where they are split), so the two runs compare bitwise.

Data is drawn from a seeded numpy generator, so every process builds the same host values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import shardopt

STEPS = 3


def to_numpy(x) -> np.ndarray:
    """The global value of `x`, in every process (jax refuses np.asarray on an array split across processes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def layouts(mesh):
    lay, U = shardopt.Layout, shardopt.UNSHARDED
    return {
        "dense/kernel": ((16, 8), lay([U, "model"], mesh)),        # split within each process
        "proj/kernel": ((8, 4), lay(["batch", U], mesh)),          # split across the two processes
        "big/kernel": ((320, 256), lay(["batch", "model"], mesh)), # over the pack limit: its own buffer
        "dense/bias": ((8,), None),                                # replicated everywhere
    }


def _host_data(shapes, steps, seed):
    rng = np.random.default_rng(seed)
    init = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    grads = [{n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()} for _ in range(steps)]
    return init, grads


def keras(mesh, **adam_kwargs) -> dict[str, np.ndarray]:
    """`shardopt.Adam(..., mesh=mesh).apply_gradients` over Variables, STEPS steps of dense numpy gradients."""
    lays = layouts(mesh)
    init, grads = _host_data({n: s for n, (s, _) in lays.items()}, STEPS, seed=11)
    vars_ = {n: shardopt.Variable(init[n], name=n, **({"layout": lay} if lay is not None else {}))
             for n, (_, lay) in lays.items()}
    opt = shardopt.Adam(1e-3, amsgrad=True, use_ema=True, mesh=mesh, **adam_kwargs)
    for g in grads:
        opt.apply_gradients([(g[n], v) for n, v in vars_.items()])
    out = {f"var/{n}": to_numpy(v.value) for n, v in vars_.items()}
    for n, v in vars_.items():
        for s in ("m", "v", "vhat", "average"):
            out[f"{s}/{n}"] = to_numpy(opt.get_slot(v, s).value)
    out["iterations"] = to_numpy(opt.iterations.value)
    return out


def keras_global_clipnorm(mesh) -> dict[str, np.ndarray]:
    return keras(mesh, global_clipnorm=0.5)


def specs(mesh):
    return {"dense": {"kernel": shardopt.VariableSpec((16, 8), "float32", layouts(mesh)["dense/kernel"][1]),
                      "bias": shardopt.VariableSpec((8,), "float32")},
            "proj": shardopt.VariableSpec((8, 4), "float32", layouts(mesh)["proj/kernel"][1]),
            "big": shardopt.VariableSpec((320, 256), "float32", layouts(mesh)["big/kernel"][1])}


def compile_step(mesh):
    return shardopt.Adam(1e-3, use_ema=True, mesh=mesh).compile(specs(mesh))


def _tree_data(step, seed):
    rng = np.random.default_rng(seed)
    def leaves():
        return [rng.standard_normal(step.contract.arg(n).shape).astype(np.float32) for n in step.names]
    p0 = jax.tree_util.tree_unflatten(step.treedef, leaves())
    grads = [jax.tree_util.tree_unflatten(step.treedef, leaves()) for _ in range(STEPS)]
    return p0, grads


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): to_numpy(x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def run_functional(step) -> dict[str, np.ndarray]:
    p0, grads = _tree_data(step, seed=5)
    p = step.place_params(p0)
    s = step.init(p)
    for g in grads:
        p, s = step(p, g, s)
    return _flat((p, s))


def compiled(mesh) -> dict[str, np.ndarray]:
    """`opt.compile(specs)` + `step.place_params` + `step.init` + `step(...)`."""
    return run_functional(compile_step(mesh))


def artifact(mesh, path) -> dict[str, np.ndarray]:
    """`shardopt.load(path)` of an artifact saved by the 8-device single process, then the same steps."""
    return run_functional(shardopt.load(path))


def in_user_jit(mesh) -> dict[str, np.ndarray]:
    """`step.as_jax_function()` inside the user's jax.jit, with donation, plus a cross-device user reduction."""
    step = compile_step(mesh)
    fn = step.as_jax_function()

    def train_step(params, grads, state):
        params, state = fn(params, grads, state)
        return params, state, jnp.sum(params["dense"]["kernel"])

    jitted = jax.jit(train_step, donate_argnums=(0, 2))
    p0, grads = _tree_data(step, seed=5)
    p = step.place_params(p0)
    s = step.init(p)
    for g in grads:
        p, s, total = jitted(p, g, s)
    out = _flat((p, s))
    out["user_sum"] = to_numpy(total)
    return out


SCENARIOS = {"keras": keras, "keras_global_clipnorm": keras_global_clipnorm, "compiled": compiled,
             "artifact": artifact, "in_user_jit": in_user_jit}
