"""Weight-update sharding (`shard_state_over`, Xu et al. 2020): slots sharded over the data axis while the
variables stay replicated on it, numbers equal to the unsharded step, on the 2x4 ('batch', 'model') mesh."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt
from shardopt.core.layout import state_layout
from shardopt.passes.pipeline import DEFAULT_PIPELINE
from shardopt.runtime.artifact import state_bytes_per_device, variables_table
from shardopt.runtime.inspect import Report

AXES = {"batch": 2, "model": 4}


# ----- the rule -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, layout, axes, want", [
    ((16, 8), (None, None), ("batch",), ("batch", None)),            # first divisible dimension
    ((3, 8), (None, None), ("batch",), (None, "batch")),             # dim 0 does not divide: the next one
    ((16, 8), (None, "model"), ("batch",), ("batch", "model")),      # an unsharded dimension comes first
    ((8, 4), ("model", None), ("batch",), (("model", "batch"), None)),  # minor to the axes already there
    ((4, 8), ("model", None), ("batch",), ("model", "batch")),       # 4 % (4*2) != 0: dim 1
    ((16,), ("batch",), ("batch",), ("batch",)),                     # already split over batch: unchanged
    ((16, 8), (None, None), ("batch", "model"), (("batch", "model"), None)),  # a tuple goes onto one dimension
])
def test_state_layout_rule(shape, layout, axes, want):
    lay, _ = state_layout(shape, layout, axes, AXES)
    assert lay == want


@pytest.mark.parametrize("shape, layout, axes, why", [
    ((3, 5), (None, None), ("batch",), "no dimension of shape"),
    ((), (), ("batch",), "no dimension of shape"),
    ((16,), (None,), ("data",), "unknown mesh axis 'data'"),
])
def test_state_layout_rule_fails_with_a_reason(shape, layout, axes, why):
    lay, reason = state_layout(shape, layout, axes, AXES)
    assert lay is None and why in reason


# ----- numbers ------------------------------------------------------------------------------------------------
def _model(mesh, rng):
    """Megatron-ish variables on 2x4 (replicated on 'batch'), one embedding for sparse gradients, one odd-sized
    bias that no dimension of 2 divides, and small ones that would be packed."""
    U = shardopt.UNSHARDED

    def var(name, shape, layout=None):
        lay = None if layout is None else shardopt.Layout(layout, mesh)
        return shardopt.Variable(rng.normal(size=shape).astype(np.float32), name=name, layout=lay)

    return [var("dense/kernel", (32, 16), [U, "model"]), var("proj/kernel", (16, 32), ["model", U]),
            var("dense/bias", (16,), ["model"]), var("embedding", (10, 8)), var("odd/bias", (3,)),
            var("ln/scale", (6,)), var("ln/bias", (6,))]


def _grads(variables, rng, step):
    out = []
    for v in variables:
        if v.name == "embedding":
            idx = np.array([1, 7, 1, (3 * step) % 10], np.int32)  # a repeated row too
            out.append(shardopt.IndexedSlices(rng.normal(size=(4, 8)).astype(np.float32), idx, v.shape))
        else:
            out.append(jnp.asarray(rng.normal(size=v.shape).astype(np.float32)))
    return out


def _train(mesh, cls=shardopt.Adam, steps=3, pack_max_elements=None, **kwargs):
    rng = np.random.default_rng(0)
    variables = _model(mesh, rng)
    opt = cls(mesh=mesh, **kwargs)
    if pack_max_elements is not None:
        opt.pack_max_elements = pack_max_elements
    for step in range(steps):
        opt.apply_gradients(zip(_grads(variables, rng, step), variables, strict=True))
    return variables, opt


ALL_ADAM = dict(learning_rate=0.05, amsgrad=True, clipvalue=0.7, use_ema=True, ema_momentum=0.9,
                ema_overwrite_frequency=2)
CLIPPED = {k: v for k, v in ALL_ADAM.items() if k != "clipvalue"}  # clipnorm/global_clipnorm take precedence


# global_clipnorm: fuse-clipping sums a pack's squared gradients in one reduction, and sharded-state variables
# leave their packs, so the global norm's summation order changes unless neither step packs (then it is bitwise).
@pytest.mark.parametrize("options, packing", [(ALL_ADAM, None), ({**CLIPPED, "clipnorm": 0.5}, None),
                                              ({**CLIPPED, "global_clipnorm": 1.0}, 0)],
                         ids=["amsgrad-ema-clipvalue", "clipnorm", "global_clipnorm-unpacked"])
def test_adam_every_option_bitwise_equal(mesh, options, packing):
    base_vars, base = _train(mesh, pack_max_elements=packing, **options)
    vars_, opt = _train(mesh, shard_state_over="batch", pack_max_elements=packing, **options)
    for a, b in zip(base_vars, vars_, strict=True):
        assert b.layout == a.layout  # the variables keep their layouts
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()), err_msg=a.name)
        for slot in ("m", "v", "vhat", "average"):
            np.testing.assert_array_equal(np.asarray(base.get_slot(a, slot).numpy()),
                                          np.asarray(opt.get_slot(b, slot).numpy()), err_msg=f"{slot}/{a.name}")
    by = {v.name: v for v in vars_}
    assert opt.get_slot(by["dense/kernel"], "m").layout.sharding_specs == ("batch", "model")
    assert opt.get_slot(by["proj/kernel"], "v").layout.sharding_specs == (("model", "batch"), "unsharded")
    assert opt.get_slot(by["dense/bias"], "average").layout.sharding_specs == (("model", "batch"),)
    assert opt.get_slot(by["embedding"], "vhat").layout.sharding_specs == ("batch", "unsharded")
    assert opt.get_slot(by["odd/bias"], "m").layout.sharding_specs == ("unsharded",)  # fallback: 3 is odd
    # sharded-state variables are not packed; odd/bias (fallback) is, with the replicated small variables
    assert {m.name for p in opt.packs for m in p.members} <= {"odd/bias"}
    m = opt.get_slot(by["dense/kernel"], "m").value
    assert m.sharding.shard_shape(m.shape) == (16, 4)  # each device holds 1/8 of it: 1/2 of its replicated shard


def test_global_clipnorm_with_packing_is_close(mesh):
    base_vars, _ = _train(mesh, global_clipnorm=1.0, **CLIPPED)
    vars_, _ = _train(mesh, shard_state_over="batch", global_clipnorm=1.0, **CLIPPED)
    for a, b in zip(base_vars, vars_, strict=True):
        np.testing.assert_allclose(np.asarray(a.numpy()), np.asarray(b.numpy()), rtol=2e-6, atol=1e-7)


def test_pass_statistics_and_the_all_gather(mesh):
    rng = np.random.default_rng(1)
    variables, opt = _train(mesh, steps=1, shard_state_over="batch", pack_max_elements=0)
    program = opt.program_for(zip(_grads(variables, rng, 0), variables, strict=True))
    stats = {st.name: st.stats for st in program.pipeline.stages}
    assert stats["propagate-layouts"]["state_sharded"] == 6
    assert stats["propagate-layouts"]["state_fallback_variables"] == ["odd/bias"]
    # a loose replicated dense update is a kernel candidate (a composite): only odd/bias, whose state is not
    # sharded; every sharded-state variable keeps the StableHLO update (ln/*, 6 = 2 x 3, are sharded)
    assert stats["lower-to-kernels"]["composites"] == 1
    hlo = program.executable.lower().compile().as_text()
    gathers = [line for line in hlo.splitlines() if re.search(r"= \S+ all-gather(-start)?\(", line)]
    # one all-gather of each new variable (per-device shape: its layout's shard); no slot is gathered
    assert len(gathers) == 6, gathers
    assert any(line.lstrip().startswith("%all-gather") and "f32[32,4]" in line for line in gathers), gathers


def test_ema_off_no_options_and_the_lone_packed_variables(mesh):
    """A variable no axis divides keeps packable state: with the global request it is packed with its peers."""
    rng = np.random.default_rng(2)
    a = shardopt.Variable(rng.normal(size=(3,)).astype(np.float32), name="a")
    b = shardopt.Variable(rng.normal(size=(5,)).astype(np.float32), name="b")
    c = shardopt.Variable(rng.normal(size=(8, 4)).astype(np.float32), name="c")
    opt = shardopt.Adam(0.1, mesh=mesh, shard_state_over="batch")
    ref = shardopt.Adam(0.1, mesh=mesh)
    ra, rb, rc = (shardopt.Variable(np.asarray(v.numpy()), name=v.name) for v in (a, b, c))
    for _ in range(2):
        gs = [jnp.asarray(rng.normal(size=v.shape).astype(np.float32)) for v in (a, b, c)]
        opt.apply_gradients(zip(gs, (a, b, c), strict=True))
        ref.apply_gradients(zip(gs, (ra, rb, rc), strict=True))
    assert [sorted(m.name for m in p.members) for p in opt.packs] == [["a", "b"]]
    for x, y in ((a, ra), (b, rb), (c, rc)):
        np.testing.assert_array_equal(np.asarray(x.numpy()), np.asarray(y.numpy()))


OPTIMIZERS = [
    (shardopt.SGD, dict(learning_rate=0.1, momentum=0.9, nesterov=True)),
    (shardopt.AdamW, dict(learning_rate=0.05, weight_decay=0.01, amsgrad=True)),
    (shardopt.RMSprop, dict(learning_rate=0.01, momentum=0.5, centered=True)),
    (shardopt.Adagrad, dict(learning_rate=0.1)),
    (shardopt.Adadelta, dict(learning_rate=1.0)),
    (shardopt.Adamax, dict(learning_rate=0.05)),
    (shardopt.Nadam, dict(learning_rate=0.05)),
    (shardopt.Ftrl, dict(learning_rate=0.1, l1_regularization_strength=0.01)),
    (shardopt.Lion, dict(learning_rate=0.01)),
]


@pytest.mark.slow
@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS, ids=[c.__name__ for c, _ in OPTIMIZERS])
def test_every_optimizer_through_the_base(mesh, cls, kwargs):
    # unpacked on both sides: a packed update is fused with its pack's peers, and XLA may contract the fused
    # chain differently (SGD's nesterov update on the packed embedding differs by 1 ulp from the loose one)
    base_vars, base = _train(mesh, cls, steps=2, pack_max_elements=0, **kwargs)
    vars_, opt = _train(mesh, cls, steps=2, shard_state_over="batch", pack_max_elements=0, **kwargs)
    for a, b in zip(base_vars, vars_, strict=True):
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()), err_msg=a.name)
    kernel = next(v for v in vars_ if v.name == "dense/kernel")
    for slot in opt.slot_names():
        assert "batch" in opt.get_slot(kernel, slot).layout.sharding_specs, slot


# ----- per variable -------------------------------------------------------------------------------------------
def test_per_variable_dict_and_callable(mesh):
    base_vars, _ = _train(mesh, steps=2, learning_rate=0.05)
    want = {"dense/kernel": "batch", "embedding": ("batch",), "ln/scale": None}
    for request in (want, lambda name: want.get(name)):
        vars_, opt = _train(mesh, steps=2, learning_rate=0.05, shard_state_over=request)
        by = {v.name: v for v in vars_}
        assert opt.get_slot(by["dense/kernel"], "m").layout.sharding_specs == ("batch", "model")
        assert opt.get_slot(by["embedding"], "v").layout.sharding_specs == ("batch", "unsharded")
        assert opt.get_slot(by["proj/kernel"], "m").layout == by["proj/kernel"].layout  # not asked
        packed = {m.name for p in opt.packs for m in p.members}
        assert "ln/scale" in packed and not packed & {"dense/kernel", "embedding"}
        for a, b in zip(base_vars, vars_, strict=True):
            np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()), err_msg=a.name)


def test_per_variable_request_that_cannot_be_met_is_an_error(mesh):
    rng = np.random.default_rng(0)
    variables = _model(mesh, rng)
    opt = shardopt.Adam(mesh=mesh, shard_state_over={"odd/bias": "batch"})
    before = np.asarray(variables[4].numpy())
    with pytest.raises(ValueError, match=r"cannot shard the state of 'odd/bias' over batch: no dimension of shape "
                                         r"\(3,\)"):
        opt.apply_gradients(zip(_grads(variables, rng, 0), variables, strict=True))
    np.testing.assert_array_equal(np.asarray(variables[4].numpy()), before)  # nothing was lost


@pytest.mark.parametrize("bad, err", [(3, TypeError), (("batch", "batch"), ValueError), ({"a": 1}, TypeError),
                                      ({1: "batch"}, TypeError)])
def test_bad_argument(mesh, bad, err):
    with pytest.raises(err, match="shard_state_over"):
        shardopt.Adam(mesh=mesh, shard_state_over=bad)


def test_unknown_axis_is_an_error_for_the_pass(mesh):
    rng = np.random.default_rng(0)
    variables = _model(mesh, rng)[:1]
    opt = shardopt.Adam(mesh=mesh, shard_state_over={"dense/kernel": "data"})
    with pytest.raises(ValueError, match="unknown mesh axis 'data'"):
        opt.apply_gradients(zip(_grads(variables, rng, 0), variables, strict=True))


def test_config_round_trip(mesh):
    opt = shardopt.Adam(0.01, mesh=mesh, shard_state_over=("batch",))
    config = opt.get_config()
    assert config["shard_state_over"] == "batch"
    assert shardopt.Adam.from_config(config).shard_state_over == "batch"
    assert "shard_state_over" not in shardopt.Adam(0.01).get_config()  # a default config stays tf-keras's
    per = shardopt.Adam(0.01, shard_state_over={"k": ("batch", "model")}).get_config()["shard_state_over"]
    assert json.loads(json.dumps(per)) == {"k": ["batch", "model"]}


# ----- compile(), artifacts, inspect, the user's jit -----------------------------------------------------------
def _specs():
    return {"w": shardopt.VariableSpec((64, 32), "float32", layout=P(None, "model")),
            "proj": shardopt.VariableSpec((32, 64), "float32", layout=P("model", None)),
            "b": shardopt.VariableSpec((32,), "float32"),
            "odd": shardopt.VariableSpec((5,), "float32")}


def test_state_bytes_per_device_drop_by_the_data_axis(mesh, tmp_path):
    plain = shardopt.Adam(1e-2, mesh=mesh, amsgrad=True)
    plain.pack_max_elements = 0  # packs add gradient scratch buffers to the state: compare like with like
    plain = plain.compile(_specs())
    sharded = shardopt.Adam(1e-2, mesh=mesh, amsgrad=True, shard_state_over="batch").compile(_specs())
    rows = {r["name"]: r for r in variables_table(sharded.contract)}
    base = {r["name"]: r for r in variables_table(plain.contract)}
    for name in ("w", "proj", "b"):
        assert rows[name]["slot_bytes_per_device"] * 2 == base[name]["slot_bytes_per_device"], name
        assert rows[name]["bytes_per_device"] == base[name]["bytes_per_device"]  # variables stay as they were
    assert rows["odd"]["slot_bytes_per_device"] == base["odd"]["slot_bytes_per_device"]  # 5 is odd: fallback
    # total state per device: the divisible slots halve; `odd`'s slots, the counter and the learning rate stay
    keep = base["odd"]["slot_bytes_per_device"] + 4 + 4
    assert state_bytes_per_device(sharded.contract) - keep == (state_bytes_per_device(plain.contract) - keep) // 2
    path = tmp_path / "sharded.shardopt"
    sharded.save(path)
    loaded = shardopt.load(path)
    manifest = loaded.artifact.manifest
    assert manifest["state_bytes_per_device"] == state_bytes_per_device(sharded.contract)
    assert {r["name"]: r["slots"]["m"] for r in manifest["variables"]}["w"] == ["batch", "model"]
    summary = Report(loaded).summary()["state"]
    assert "slots of 3 variables sharded over batch as well" in summary, summary
    assert "sharded over" not in Report(plain).summary()["state"]
    # the loaded step runs bitwise like the one compiled here
    rng = np.random.default_rng(3)
    values = {k: rng.normal(size=s.shape).astype(np.float32) for k, s in _specs().items()}
    grads = {k: rng.normal(size=s.shape).astype(np.float32) for k, s in _specs().items()}
    outs = []
    for step in (sharded, loaded, plain):
        params = step.place_params(values)
        state = step.init(params)
        for _ in range(2):
            params, state = step(params, step.place_params(grads), state)
        outs.append(params)
    for k in values:
        np.testing.assert_array_equal(np.asarray(outs[0][k]), np.asarray(outs[1][k]))
        np.testing.assert_array_equal(np.asarray(outs[0][k]), np.asarray(outs[2][k]))


def test_compile_per_variable_by_path_and_inspect_rows(mesh):
    step = shardopt.Adam(1e-2, mesh=mesh, shard_state_over={"w": "batch"}).compile(_specs())
    rows = {r["name"]: r for r in Report(step).variables()}
    assert rows["w"]["slots"]["v"] == ["batch", "model"] and rows["w"]["storage"] == "own buffers"
    assert rows["proj"]["slots"]["v"] == ["model", None]
    with pytest.raises(ValueError, match="cannot shard the state of 'odd'"):
        shardopt.Adam(1e-2, mesh=mesh, shard_state_over={"odd": "batch"}).compile(_specs())


def _user_jit(step, mesh):
    fn = step.as_jax_function()
    rng = np.random.default_rng(4)
    params = step.place_params({k: rng.normal(size=s.shape).astype(np.float32) * 0.1 for k, s in _specs().items()})
    state = step.init(params)
    x = jax.device_put(rng.normal(size=(16, 64)).astype(np.float32), NamedSharding(mesh, P("batch", None)))

    def train(params, state, x):
        def loss(p):
            h = jnp.tanh(x @ p["w"] + p["b"])
            return jnp.sum((h @ p["proj"]) ** 2) + jnp.sum(p["odd"] ** 2)
        grads = jax.grad(loss)(params)  # partial sums per 'batch' shard until XLA reduces them
        return fn(params, grads, state)

    jitted = jax.jit(train)
    hlo = jitted.lower(params, state, x).compile().as_text()
    for _ in range(2):
        params, state = jitted(params, state, x)
    return params, state, hlo


def test_embedded_in_the_users_jit():
    mesh = jax.make_mesh((2, 4), ("batch", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    # like with like: the state-sharded w and proj are updated by XLA's loops, so the plain step is too (with the
    # kernel, proj differs by 1 ulp in ~1% of elements here: in the user's jit XLA fuses the transpose of proj's
    # gradient into its update loops, which then round a few elements unlike the kernel and the unfused loops)
    opt = shardopt.Adam(1e-2, mesh=mesh)
    opt.pipeline = tuple("lower-to-kernels{enabled=false}" if p == "lower-to-kernels" else p for p in DEFAULT_PIPELINE)
    plain = opt.compile(_specs())
    sharded = shardopt.Adam(1e-2, mesh=mesh, shard_state_over="batch").compile(_specs())
    p0, _, hlo0 = _user_jit(plain, mesh)
    p1, s1, hlo1 = _user_jit(sharded, mesh)
    for k in p0:
        np.testing.assert_array_equal(np.asarray(p0[k]), np.asarray(p1[k]), err_msg=k)
    assert s1["m/w"].sharding.spec == P("batch", "model")

    def count(kind, text):
        return len(re.findall(rf"= \S+ {kind}(-start)?\(", text))

    # the new w, proj and b are all-gathered over 'batch' from their shards (w: f32[64,8] per device)
    assert count("all-gather", hlo1) >= count("all-gather", hlo0) + 3
    assert re.search(r"f32\[64,8\]\{1,0\} all-gather\(", hlo1)
    # XLA:CPU has no reduce-scatter rewrite: the gradients' all-reduce stays, followed by the local slice the
    # sharded update reads (XLA:GPU/TPU turn all-reduce + dynamic-slice into a reduce-scatter; on CPU,
    # compile(..., scatter_gradients=True) with the user's psum_scatter gives one: tests/test_scatter_gradients.py)
    assert count("reduce-scatter", hlo1) == 0 and count("all-reduce", hlo1) >= 1


def test_checkpoint_moves_between_sharded_and_replicated_state(mesh):
    """`state_dict` of a sharded-state optimizer restores into a replicated one (and back), and training goes
    on bitwise: the layouts are the optimizer's, the values the same."""
    rng = np.random.default_rng(5)
    variables = _model(mesh, rng)
    sharded = shardopt.Adam(0.05, mesh=mesh, amsgrad=True, shard_state_over="batch")
    sharded.pack_max_elements = 0
    sharded.apply_gradients(zip(_grads(variables, rng, 0), variables, strict=True))
    saved = sharded.state_dict()
    assert saved["m/dense/kernel"].sharding.spec == P("batch", "model")
    copies = [shardopt.Variable(np.asarray(v.numpy()), name=v.name, layout=v.layout) for v in variables]
    plain = shardopt.Adam(0.05, mesh=mesh, amsgrad=True)
    plain.pack_max_elements = 0
    plain.build(copies)
    plain.load_state_dict(saved)
    assert plain.state_dict()["m/dense/kernel"].sharding.spec == P(None, "model")
    for step in range(1, 3):
        grads = _grads(variables, rng, step)
        sharded.apply_gradients(zip(grads, variables, strict=True))
        plain.apply_gradients(zip(grads, copies, strict=True))
    for a, b in zip(variables, copies, strict=True):
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()), err_msg=a.name)


def test_finalize_variable_values_gathers_the_sharded_average(mesh):
    rng = np.random.default_rng(6)
    variables = _model(mesh, rng)[:2]
    opt = shardopt.Adam(0.05, mesh=mesh, use_ema=True, shard_state_over="batch")
    opt.apply_gradients(zip(_grads(variables, rng, 0), variables, strict=True))
    average = np.asarray(opt.get_slot(variables[0], "average").numpy())
    opt.finalize_variable_values(variables)
    assert variables[0].value.sharding.spec == P(None, "model")  # its own layout, not the state's
    np.testing.assert_array_equal(np.asarray(variables[0].numpy()), average)
    opt.apply_gradients(zip(_grads(variables, rng, 1), variables, strict=True))  # the next step takes it
