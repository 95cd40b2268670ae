"""Checkpoints (issue 12, wall 5): `opt.state_dict()` / `opt.load_state_dict(d)` and the functional step's
`step.state_dict(state)` / `step.load_state_dict(d)`, through orbax-checkpoint on the 2x4 mesh with a bitwise
resume: train 5 steps, save, train 5 more; restore into a fresh optimizer, train the same 5 -> bitwise equal.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import shardopt

ocp = pytest.importorskip("orbax.checkpoint")
rng = np.random.default_rng(5)
SHAPES = {"dense/kernel": (16, 8), "dense/bias": (8,), "emb/table": (32, 16)}
INIT = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
GRADS = [{n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()} for _ in range(10)]


def layouts(mesh):
    return {"dense/kernel": shardopt.Layout([shardopt.UNSHARDED, "model"], mesh), "dense/bias": None,
            "emb/table": shardopt.Layout(["model", shardopt.UNSHARDED], mesh)}


def make(mesh, values, **kw):
    variables = [shardopt.Variable(np.asarray(values[n]), name=n, layout=layouts(mesh)[n]) for n in SHAPES]
    return variables, shardopt.Adam(1e-2, amsgrad=True, use_ema=True, mesh=mesh, **kw)


def train(opt, variables, grads):
    for g in grads:
        opt.apply_gradients([(g[v.name], v) for v in variables])


def assert_bitwise(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_state_dict_names_and_layouts(mesh):
    variables, opt = make(mesh, INIT)
    train(opt, variables, GRADS[:2])
    d = opt.state_dict()
    assert sorted(d) == sorted(["iteration"] + [f"{s}/{n}" for s in ("m", "v", "vhat", "average") for n in SHAPES])
    assert int(d["iteration"]) == 2
    assert d["m/dense/kernel"].sharding.spec == P(None, "model")
    assert d["v/emb/table"].sharding.spec == P("model", None)
    train(opt, variables, GRADS[2:3])  # the dict holds copies: the next step (donating the state) keeps them
    assert int(d["iteration"]) == 2 and not d["m/emb/table"].is_deleted()


@pytest.mark.parametrize("pack", ["packed", "unpacked"])
def test_orbax_round_trip_resumes_bitwise(mesh, tmp_path, pack):
    variables, opt = make(mesh, INIT)
    train(opt, variables, GRADS[:5])
    ckpt = {"params": {v.name: v.value for v in variables}, "opt": opt.state_dict()}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", ckpt)
    train(opt, variables, GRADS[5:])
    want = {v.name: np.asarray(v.value) for v in variables} | {k: np.asarray(x) for k, x in opt.state_dict().items()}

    fresh_vars, fresh = make(mesh, {n: np.zeros(s, np.float32) for n, s in SHAPES.items()})
    if pack == "unpacked":
        fresh.pack_max_elements = 0  # a checkpoint does not depend on how the state is packed
    fresh.build(fresh_vars)
    target = {"params": {v.name: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for v in fresh_vars},
              "opt": fresh.state_dict_specs()}
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "ckpt", target)
    for v in fresh_vars:
        v.assign(restored["params"][v.name])
    fresh.load_state_dict(restored["opt"])
    assert fresh.iterations.value.sharding.is_fully_replicated
    train(fresh, fresh_vars, GRADS[5:])
    got = {v.name: np.asarray(v.value) for v in fresh_vars} | {k: np.asarray(x) for k, x in fresh.state_dict().items()}
    assert_bitwise(got, want)
    assert int(fresh.iterations.value) == 10


def test_load_state_dict_builds_from_var_list_or_says_how(mesh):
    variables, opt = make(mesh, INIT)
    train(opt, variables, GRADS[:1])
    d = opt.state_dict()
    fresh_vars, fresh = make(mesh, INIT)
    with pytest.raises(RuntimeError, match="not built.*var_list="):
        fresh.load_state_dict(d)
    fresh.load_state_dict(d, var_list=fresh_vars)
    np.testing.assert_array_equal(np.asarray(fresh.get_slot(fresh_vars[0], "m").value),
                                  np.asarray(opt.get_slot(variables[0], "m").value))
    assert fresh.get_slot(fresh_vars[0], "m").value.sharding.spec == P(None, "model")


def test_load_state_dict_validates_before_writing(mesh):
    variables, opt = make(mesh, INIT)
    train(opt, variables, GRADS[:1])
    d = opt.state_dict()
    before = {k: np.asarray(v) for k, v in opt.state_dict().items()}
    bad = {**{k: np.zeros_like(np.asarray(v)) for k, v in d.items()}, "v/dense/bias": np.zeros((9,), np.float32),
           "m/dense/kernel": np.zeros((16, 8), np.float16), "m/extra": np.zeros(3)}
    del bad["iteration"]
    with pytest.raises(shardopt.StepInputError) as e:
        opt.load_state_dict(bad)
    msg = str(e.value)
    assert "missing ['iteration']" in msg and "unexpected ['m/extra']" in msg
    assert "v/dense/bias: expected shape (8,), got (9,)" in msg
    assert "m/dense/kernel: expected dtype float32, got float16" in msg
    assert_bitwise({k: np.asarray(v) for k, v in opt.state_dict().items()}, before)


def functional_step(mesh):
    specs = {}
    for n, s in SHAPES.items():
        a, b = n.split("/")
        specs.setdefault(a, {})[b] = shardopt.VariableSpec(s, "float32", layouts(mesh)[n])
    return shardopt.Adam(1e-2, amsgrad=True, mesh=mesh).compile(specs)


def nest(flat):
    out = {}
    for n, x in flat.items():
        a, b = n.split("/")
        out.setdefault(a, {})[b] = x
    return out


def test_functional_orbax_round_trip_resumes_bitwise(mesh, tmp_path):
    step = functional_step(mesh)
    params = step.place_params(nest(INIT))
    state = step.init(params)
    for g in GRADS[:5]:
        params, state = step(params, nest(g), state)
    d = step.state_dict(state)
    assert "m/dense/kernel" in d and "iteration" in d and "learning_rate" in d
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", {"params": params, "opt": d})
    for g in GRADS[5:]:
        params, state = step(params, nest(g), state)
    want = jax.tree.map(np.asarray, (params, step.state_dict(state)))

    step2 = functional_step(mesh)  # a fresh compile, as in a new process
    target = {"params": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding),
                                     step2.place_params(nest(INIT))), "opt": step2.state_dict_specs()}
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "ckpt", target)
    params2, state2 = restored["params"], step2.load_state_dict(restored["opt"])
    for g in GRADS[5:]:
        params2, state2 = step2(params2, nest(g), state2)
    got = jax.tree.map(np.asarray, (params2, step2.state_dict(state2)))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(shardopt.StepInputError, match="missing \\['iteration'\\]"):
        step2.load_state_dict({k: v for k, v in d.items() if k != "iteration"})
