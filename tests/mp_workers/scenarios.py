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


def _keras_make(mesh, init, **adam_kwargs):
    vars_ = {n: shardopt.Variable(init[n], name=n, **({"layout": lay} if lay is not None else {}))
             for n, (_, lay) in layouts(mesh).items()}
    return vars_, shardopt.Adam(1e-3, amsgrad=True, use_ema=True, mesh=mesh, **adam_kwargs)


def _keras_out(vars_, opt) -> dict[str, np.ndarray]:
    out = {f"var/{n}": to_numpy(v.value) for n, v in vars_.items()}
    for n, v in vars_.items():
        for s in ("m", "v", "vhat", "average"):
            out[f"{s}/{n}"] = to_numpy(opt.get_slot(v, s).value)
    out["iterations"] = to_numpy(opt.iterations.value)
    return out


def keras(mesh, **adam_kwargs) -> dict[str, np.ndarray]:
    """`shardopt.Adam(..., mesh=mesh).apply_gradients` over Variables, STEPS steps of dense numpy gradients."""
    init, grads = _host_data({n: s for n, (s, _) in layouts(mesh).items()}, STEPS, seed=11)
    vars_, opt = _keras_make(mesh, init, **adam_kwargs)
    for g in grads:
        opt.apply_gradients([(g[n], v) for n, v in vars_.items()])
    return _keras_out(vars_, opt)


def keras_global_clipnorm(mesh) -> dict[str, np.ndarray]:
    return keras(mesh, global_clipnorm=0.5)


def keras_clipnorm(mesh) -> dict[str, np.ndarray]:
    """Per-tensor norms: a variable split across processes sums its squares across them too."""
    return keras(mesh, clipnorm=0.05)


def fused_norms(mesh) -> dict[str, np.ndarray]:
    """`compile()` with global_clipnorm over pairs of variables of each layout (packed where small):
    fuse-clipping batches their norms and fixed-order-sums gathers the batched partials."""
    lay, U = shardopt.Layout, shardopt.UNSHARDED
    kinds = {"a": ((16, 8), lay(["batch", U], mesh)), "b": ((8, 16), lay([U, "model"], mesh)),
             "c": ((8, 8), lay(["batch", "model"], mesh)), "d": ((8,), None)}
    specs = {f"{k}{i}": shardopt.VariableSpec(shape, "float32", layout) for k, (shape, layout) in kinds.items()
             for i in range(2)}
    return run_functional(shardopt.Adam(1e-3, global_clipnorm=0.5, mesh=mesh).compile(specs))


def specs(mesh):
    return {"dense": {"kernel": shardopt.VariableSpec((16, 8), "float32", layouts(mesh)["dense/kernel"][1]),
                      "bias": shardopt.VariableSpec((8,), "float32")},
            "proj": shardopt.VariableSpec((8, 4), "float32", layouts(mesh)["proj/kernel"][1]),
            "big": shardopt.VariableSpec((320, 256), "float32", layouts(mesh)["big/kernel"][1])}


def compile_step(mesh, **adam_kwargs):
    return shardopt.Adam(1e-3, use_ema=True, mesh=mesh, **adam_kwargs).compile(specs(mesh))


def _tree_data(step, seed, steps=STEPS):
    rng = np.random.default_rng(seed)
    def leaves():
        return [rng.standard_normal(step.contract.arg(n).shape).astype(np.float32) for n in step.names]
    p0 = jax.tree_util.tree_unflatten(step.treedef, leaves())
    grads = [jax.tree_util.tree_unflatten(step.treedef, leaves()) for _ in range(steps)]
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


# --- checkpoints (orbax) and reading variables split across processes ------------------------------------------

SAVE_AT, CKPT_STEPS = 3, 6


def _orbax():
    import orbax.checkpoint as ocp
    return ocp


def keras_checkpoint_save(mesh, directory) -> dict[str, np.ndarray]:
    """CKPT_STEPS steps with global_clipnorm, saving params + `opt.state_dict()` through orbax after SAVE_AT:
    the uninterrupted trajectory, and a checkpoint written by however many processes run this."""
    init, grads = _host_data({n: s for n, (s, _) in layouts(mesh).items()}, CKPT_STEPS, seed=13)
    vars_, opt = _keras_make(mesh, init, global_clipnorm=0.5)
    for k, g in enumerate(grads):
        if k == SAVE_AT:
            with _orbax().StandardCheckpointer() as ckpt:
                ckpt.save(f"{directory}/keras", {"params": {n: v.value for n, v in vars_.items()},
                                                 "opt": opt.state_dict()})
        opt.apply_gradients([(g[n], v) for n, v in vars_.items()])
    return _keras_out(vars_, opt)


def keras_checkpoint_resume(mesh, directory) -> dict[str, np.ndarray]:
    """A fresh optimizer over fresh variables restores the checkpoint (restore target: `state_dict_specs`) and
    runs the remaining steps; must end where keras_checkpoint_save ended, whatever process layout saved it."""
    shapes = {n: s for n, (s, _) in layouts(mesh).items()}
    _, grads = _host_data(shapes, CKPT_STEPS, seed=13)
    vars_, opt = _keras_make(mesh, {n: np.zeros(s, np.float32) for n, s in shapes.items()}, global_clipnorm=0.5)
    opt.build(list(vars_.values()))
    target = {"params": {n: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for n, v in vars_.items()},
              "opt": opt.state_dict_specs()}
    with _orbax().StandardCheckpointer() as ckpt:
        restored = ckpt.restore(f"{directory}/keras", target)
    for n, v in vars_.items():
        v.assign(restored["params"][n])
    opt.load_state_dict(restored["opt"])
    for g in grads[SAVE_AT:]:
        opt.apply_gradients([(g[n], v) for n, v in vars_.items()])
    return _keras_out(vars_, opt)


def functional_checkpoint_save(mesh, directory) -> dict[str, np.ndarray]:
    """The same for `compile()`'s step: params + `step.state_dict(state)` saved after SAVE_AT steps."""
    step = compile_step(mesh, global_clipnorm=0.5)
    p0, grads = _tree_data(step, seed=17, steps=CKPT_STEPS)
    p = step.place_params(p0)
    s = step.init(p)
    for k, g in enumerate(grads):
        if k == SAVE_AT:
            with _orbax().StandardCheckpointer() as ckpt:
                ckpt.save(f"{directory}/functional", {"params": p, "opt": step.state_dict(s)})
        p, s = step(p, g, s)
    return _flat((p, step.state_dict(s)))


def functional_checkpoint_resume(mesh, directory) -> dict[str, np.ndarray]:
    step = compile_step(mesh, global_clipnorm=0.5)
    p0, grads = _tree_data(step, seed=17, steps=CKPT_STEPS)
    target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                     step.place_params(p0)), "opt": step.state_dict_specs()}
    with _orbax().StandardCheckpointer() as ckpt:
        restored = ckpt.restore(f"{directory}/functional", target)
    p, s = restored["params"], step.load_state_dict(restored["opt"])
    for g in grads[SAVE_AT:]:
        p, s = step(p, g, s)
    return _flat((p, step.state_dict(s)))


def read_variables(mesh) -> dict[str, np.ndarray]:
    """`numpy()` of every variable (and slot) after a step: the ones this process holds whole read as usual; one
    split across processes raises NotInThisProcessError (its message says how), and `gather()`, called in every
    process, returns the whole value. "raised/<name>" records 1 where numpy() raised the clear error."""
    init, grads = _host_data({n: s for n, (s, _) in layouts(mesh).items()}, 1, seed=19)
    vars_, opt = _keras_make(mesh, init)
    opt.apply_gradients([(grads[0][n], v) for n, v in vars_.items()])
    out = {}
    for n, v in vars_.items():
        for key, var in ((f"var/{n}", v), (f"m/{n}", opt.get_slot(v, "m"))):
            out[key] = var.gather()
            try:
                np.testing.assert_array_equal(var.numpy(), out[key])
                out[f"raised/{key}"] = np.asarray(0)
            except shardopt.NotInThisProcessError as e:
                assert "split across processes" in str(e) and ".gather()" in str(e), e
                out[f"raised/{key}"] = np.asarray(1)
                pieces = var.local_shards()
                assert pieces and all(np.array_equal(out[key][i], x) for i, x in pieces)
    return out


SCENARIOS = {"keras": keras, "keras_global_clipnorm": keras_global_clipnorm, "keras_clipnorm": keras_clipnorm,
             "fused_norms": fused_norms, "compiled": compiled, "artifact": artifact, "in_user_jit": in_user_jit,
             "keras_checkpoint_save": keras_checkpoint_save, "keras_checkpoint_resume": keras_checkpoint_resume,
             "functional_checkpoint_save": functional_checkpoint_save,
             "functional_checkpoint_resume": functional_checkpoint_resume, "read_variables": read_variables}
