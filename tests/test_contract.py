"""The step contract is one description every path reads: every caller (apply_gradients, compile(), artifacts,
as_jax_function, as_optax, the CLI) gets the same packed, fused step, and the contract round-trips as data."""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shardopt
from shardopt.core.contract import (
    GRADIENT_BUFFER,
    SLOT,
    VARIABLE,
    StepContract,
    StepEntry,
    build_contract,
)
from shardopt.core.packing import plan_packs


def _specs(mesh, count=6):
    specs = {f"rows{i}": shardopt.VariableSpec((8, 3), "float32", jax.NamedSharding(mesh, jax.P("model")))
             for i in range(count)}
    specs.update({f"flat{i}": shardopt.VariableSpec((5,), "float32") for i in range(count)})
    specs["big"] = shardopt.VariableSpec((16, 8), "float32", jax.NamedSharding(mesh, jax.P(None, "model")))
    return specs


def _groups(pipeline):
    """Packs updated as one: fused by fuse-moments, or lowered whole to the pack kernel by lower-to-kernels."""
    return pipeline.stage("fuse-moments").stats["groups"] + \
        pipeline.stage("lower-to-kernels").stats.get("packs_lowered", 0)


def _fused_groups(step):
    return _groups(step.program.pipeline)


def test_contract_is_data_read_by_key(mesh):
    entries = [StepEntry(n, (8,), "float32", (None,), ("m", "v")) for n in ("a", "b")]
    entries.append(StepEntry("c", (8, 4), "float32", ("model", None), ("m", "v"), sparse_rows=3))
    packs = plan_packs([(e.name, e.shape, e.dtype, e.layout) for e in entries], {"batch": 2, "model": 4})
    contract = build_contract(entries, (("batch", 2), ("model", 4)), True, packs, ("m", "v"))
    assert [p.name for p in contract.packs] == ["@pack0/float32"]
    assert contract.variables == ("a", "b", "c")
    spec, index = contract.slot_arg("b", "v")
    assert (spec.role, spec.slot, spec.pack, index) == (SLOT, "v", "@pack0/float32", 1)
    spec, index = contract.slot_arg("c", "m")
    assert (spec.owner, spec.pack, index) == ("c", None, None)
    assert [a.role for a in contract.args_with_role(GRADIENT_BUFFER)] == [GRADIENT_BUFFER]
    assert contract.arg("grad_indices/c").shape == (3,)
    assert all(contract.result_of(a) is not None for a in contract.args if a.role in (VARIABLE, SLOT))
    assert contract.result_of(contract.arg("grad/a")) is None
    again = StepContract.from_json(json.loads(contract.dumps()))
    assert again == contract and again.packs == contract.packs
    with pytest.raises(ValueError, match="version"):
        StepContract.from_json({**contract.to_json(), "version": 1})


@pytest.fixture(scope="module")
def compiled(mesh):
    return shardopt.Adam(1e-3, mesh=mesh).compile(_specs(mesh))


def test_compile_packs_and_fuses_like_apply_gradients(mesh, compiled):
    """compile()'s functional step has the packs apply_gradients has, fused by fuse-moments."""
    assert [len(p.members) for p in compiled.packs] == [6, 6]
    assert _fused_groups(compiled) == 2
    variables = {n: shardopt.Variable(np.ones(s.shape, np.float32), name=n, layout=s.layout)
                 for n, s in _specs(mesh).items()}
    opt = shardopt.Adam(1e-3, mesh=mesh)
    program = opt.program_for([(jnp.ones(v.shape), v) for v in variables.values()])
    def members(contract):
        return sorted(tuple(m.name for m in p.members) for p in contract.packs)
    assert members(program.contract) == members(compiled.contract)
    assert _groups(program.pipeline) == 2


def test_functional_and_stateful_paths_agree_bitwise(mesh, compiled):
    specs = _specs(mesh)
    rng = np.random.default_rng(0)
    init = {n: rng.normal(size=s.shape).astype(np.float32) for n, s in specs.items()}
    grads = [{n: rng.normal(size=s.shape).astype(np.float32) for n, s in specs.items()} for _ in range(3)]
    params = compiled.place_params(init)
    state = compiled.init(params)
    for g in grads:
        params, state = compiled(params, compiled.place_params(g), state)
    opt = shardopt.Adam(1e-3, mesh=mesh)
    variables = {n: shardopt.Variable(init[n], name=n, layout=s.layout) for n, s in specs.items()}
    for g in grads:
        opt.apply_gradients([(jnp.asarray(g[n]), v) for n, v in variables.items()])
    slots = compiled.slots(state)
    for n, v in variables.items():
        np.testing.assert_array_equal(np.asarray(params[n]), v.numpy(), err_msg=n)
        np.testing.assert_array_equal(np.asarray(slots["m"][n]), opt.get_slot(v, "m").numpy(), err_msg=n)
    assert int(state["iterations"]) == 3 == int(opt.iterations.value)


def test_embedded_and_optax_paths_are_packed(mesh, compiled):
    tx = shardopt.as_optax(shardopt.Adam(1e-3, mesh=mesh))
    params = compiled.place_params({n: np.ones(s.shape, np.float32) for n, s in _specs(mesh).items()})
    state = tx.init(params)
    (fn,) = tx.init.steps.values()
    assert _fused_groups(fn.step) == 2
    assert any(k.startswith("m/@pack") for k in state.buffers)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert int(state.iterations) == 1
    jitted = jax.jit(compiled.as_jax_function())
    new_params, new_state = jitted(params, grads, compiled.init(params))
    np.testing.assert_array_equal(np.asarray(new_params["flat0"]),
                                  np.asarray(params["flat0"] + updates["flat0"]))


def test_artifact_keeps_packs_reports_them_and_compiles_once(compiled, tmp_path):
    """A step compiled on an Explicit-axes mesh (jax.make_mesh's default) and loaded without mesh= compiles
    once: the loaded mesh has the axis types the step was compiled for."""
    path = tmp_path / "adam.shardopt"
    compiled.save(path)
    step = shardopt.load(path)
    assert step.packs == compiled.packs
    assert step.mesh.axis_types == compiled.mesh.axis_types
    params = step.place_params({n: np.ones(s.shape, np.float32) for n, s in _specs(compiled.mesh).items()})
    state = step.init(params)
    grads = jax.tree.map(lambda x: x * 0.1, params)
    for _ in range(3):
        params, state = step(params, grads, state)
    assert step.executable._fn._cache_size() == 1
    out = io.StringIO()
    report = step.inspect(file=out)
    text = out.getvalue()
    # both packs (rows sharded on dim 0, and flat) lowered whole to the pack kernel, the rows per device
    assert "groups=0" in text and "packs_lowered=2" in text and "@pack0/float32 6 variables" in text, text
    rows = {r["name"]: r for r in report.variables()}
    assert rows["flat0"]["storage"].startswith("@pack") and rows["big"]["storage"] == "own buffers"
    assert rows["rows0"]["slots"]["m"] == ["model", None]


def test_duplicate_variable_names_get_their_own_updates(mesh):
    """Two Keras layers' `kernel`s in one apply_gradients: each keeps its own update (issue 13)."""
    a = shardopt.Variable(np.ones(4, np.float32), name="kernel")
    b = shardopt.Variable(np.ones(4, np.float32), name="kernel")
    opt = shardopt.Adam(0.1, mesh=mesh)
    opt.apply_gradients([(jnp.ones(4), a), (-jnp.ones(4), b)])
    assert (a.numpy() < 1).all() and (b.numpy() > 1).all()
    with pytest.raises(ValueError, match="more than once"):
        opt.apply_gradients([(jnp.ones(4), a), (jnp.ones(4), a)])


def test_concurrent_steps_are_serialized(mesh):
    """Two threads stepping one optimizer: every update lands (a lock around build and step)."""
    import threading

    variables = [shardopt.Variable(np.zeros(8, np.float32), name=f"v{i}") for i in range(4)]
    opt = shardopt.Adam(0.01, mesh=mesh)
    errors = []

    def work():
        try:
            for _ in range(5):
                opt.apply_gradients([(jnp.ones(8), v) for v in variables])
        except Exception as e:  # noqa: BLE001 - recorded for the assertion
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and int(opt.iterations.value) == 10 and len(opt.variables) == 1 + 2 * 4
