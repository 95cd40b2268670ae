"""Checkpoint and resume a shardopt optimizer with orbax-checkpoint, on a 2x4 ('batch', 'model') mesh.

    python examples/orbax_checkpoint.py

`opt.state_dict()` is a flat dict of named, sharded jax arrays (`m/dense/kernel`, ..., `iteration`); orbax saves
it beside the variables. A fresh optimizer restores it with `opt.load_state_dict(d)` (validated, laid out on its
layouts) and resumes bitwise. The functional step has the same: `step.state_dict(state)` and
`step.load_state_dict(d)`, with `step.state_dict_specs()` as orbax's restore target.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

import shardopt  # noqa: E402

SHAPES = {"dense/kernel": (16, 8), "dense/bias": (8,)}


def make(mesh: jax.sharding.Mesh, values: dict[str, np.ndarray]) -> tuple[list[shardopt.Variable], shardopt.Adam]:
    layouts = {"dense/kernel": shardopt.Layout([shardopt.UNSHARDED, "model"], mesh), "dense/bias": None}
    variables = [shardopt.Variable(values[n], name=n, layout=layouts[n]) for n in SHAPES]
    return variables, shardopt.Adam(1e-2, mesh=mesh)


def main() -> None:
    mesh = jax.make_mesh((2, 4), ("batch", "model"))
    rng = np.random.default_rng(0)
    grads = [{n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()} for _ in range(10)]
    variables, opt = make(mesh, {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()})

    def train(opt, variables, gs):
        for g in gs:
            opt.apply_gradients([(g[v.name], v) for v in variables])

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "step5")
        train(opt, variables, grads[:5])
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path, {"params": {v.name: v.value for v in variables}, "opt": opt.state_dict()})
        print("saved:", {k: f"{v.dtype}{list(v.shape)} {v.sharding.spec}" for k, v in opt.state_dict().items()})
        train(opt, variables, grads[5:])

        # a fresh optimizer (as in a new process): build it, restore into its layouts, resume
        fresh_vars, fresh = make(mesh, {n: np.zeros(s, np.float32) for n, s in SHAPES.items()})
        fresh.build(fresh_vars)
        target = {"params": {v.name: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for v in fresh_vars},
                  "opt": fresh.state_dict_specs()}
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(path, target)
        for v in fresh_vars:
            v.assign(restored["params"][v.name])
        fresh.load_state_dict(restored["opt"])
        train(fresh, fresh_vars, grads[5:])

    same = all(np.array_equal(np.asarray(a.value), np.asarray(b.value))
               for a, b in zip(variables, fresh_vars, strict=True))
    print(f"resumed at step 5, trained to step {int(fresh.iterations.value)}: bitwise equal to the uninterrupted "
          f"run: {same}")
    if not same:
        raise SystemExit(1)
    if not functional_step(mesh, grads):
        raise SystemExit(1)


def functional_step(mesh: jax.sharding.Mesh, grads: list[dict[str, np.ndarray]]) -> bool:
    """The same for the functional step: `step.state_dict(state)` to orbax, `step.state_dict_specs()` as the
    restore target, `step.load_state_dict(d)` back to a state; resumed bitwise."""
    specs = {"dense": {"kernel": shardopt.VariableSpec((16, 8), "float32",
                                                       shardopt.Layout([shardopt.UNSHARDED, "model"], mesh)),
                       "bias": shardopt.VariableSpec((8,), "float32")}}
    step = shardopt.Adam(1e-2, mesh=mesh).compile(specs)
    as_tree = lambda g: {"dense": {"kernel": g["dense/kernel"], "bias": g["dense/bias"]}}  # noqa: E731
    params = step.place_params(as_tree({n: np.ones(s, np.float32) for n, s in SHAPES.items()}))
    state = step.init(params)
    for g in grads[:5]:
        params, state = step(params, as_tree(g), state)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "functional")
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path, {"params": params, "opt": step.state_dict(state)})
        saved = jax.tree.map(lambda x: x.copy(), params)
        for g in grads[5:]:
            params, state = step(params, as_tree(g), state)
        target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), saved),
                  "opt": step.state_dict_specs()}
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(path, target)
    resumed, resumed_state = restored["params"], step.load_state_dict(restored["opt"])
    for g in grads[5:]:
        resumed, resumed_state = step(resumed, as_tree(g), resumed_state)
    same = all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(resumed), strict=True))
    print(f"functional step: saved {sorted(step.state_dict_specs())} at step 5, resumed to step "
          f"{int(resumed_state['iterations'])}: bitwise equal to the uninterrupted run: {same}")
    return same


if __name__ == "__main__":
    main()
