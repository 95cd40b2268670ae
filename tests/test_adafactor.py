"""Adafactor's factored slots through every path: layouts on the 2x4 mesh, packing, the functional step, its
state dict and artifact, the layout checks of `propagate-layouts`, and the two passes its update exercises.
(Numerics against tf-keras and Keras 3 are rows of test_optimizers_table.py / test_optimizers_keras3.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from jax.sharding import PartitionSpec

import shardopt
from shardopt import Layout
from shardopt.compiler import compile_step
from shardopt.core.contract import StepEntry
from shardopt.core.errors import PassError

SPECS = {  # name: (shape, layout on the 2x4 ('batch', 'model') mesh; None = replicated)
    "w": ((8, 4), ("batch", "model")),
    "t": ((2, 4, 8), (None, "batch", "model")),
    "m": ((6, 5), None),
    "b": ((12,), None),
    "d": ((3,), None),
}
STEPS = 4


def _values(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(shape).astype(np.float32) for n, (shape, _) in SPECS.items()}


def _variables(mesh) -> dict[str, shardopt.Variable]:
    return {n: shardopt.Variable(v, name=n, layout=None if SPECS[n][1] is None else Layout(SPECS[n][1], mesh))
            for n, v in _values(0).items()}


def test_factored_slots_keep_the_layout_of_the_dims_they_keep(mesh):
    variables = _variables(mesh)
    opt = shardopt.Adafactor(learning_rate=0.05, mesh=mesh)
    for step in range(STEPS):
        opt.apply_gradients([(g, variables[n]) for n, g in _values(step + 1).items()])
    want = {("w", "r"): ("batch",), ("w", "c"): ("model",), ("w", "v"): ("batch", "model"),
            ("t", "r"): (None, "batch"), ("t", "c"): (None, "model"), ("m", "r"): (None,), ("m", "c"): (None,)}
    for (n, slot), spec in want.items():
        value = opt.get_slot(variables[n], slot).value  # as the step returned it
        assert value.sharding.spec == PartitionSpec(*spec), (n, slot)
    assert opt.get_slot(variables["t"], "r").shape == (2, 4) and opt.get_slot(variables["t"], "c").shape == (2, 8)
    with pytest.raises(KeyError, match="has no slot 'r'"):
        opt.get_slot(variables["b"], "r")  # tf-keras's rank-1 r and c are dummies outside `variables`
    # Rank-1 variables pack (with v only); factored ones stay loose.
    assert [m.name for p in opt.packs for m in p.members] == ["b", "d"]
    assert sorted(opt.state_dict()) == sorted(["iteration", *(f"v/{n}" for n in SPECS),
                                               *(f"{s}/{n}" for n in ("w", "t", "m") for s in "rc")])


def test_functional_step_state_dict_and_artifact(mesh, tmp_path):
    """compile() equals apply_gradients bitwise; the state dict has r/c of their own shapes and layouts and
    restores; the saved step runs the same in a fresh load."""
    variables = _variables(mesh)
    opt = shardopt.Adafactor(learning_rate=0.05, weight_decay=0.01, mesh=mesh)
    specs = {n: shardopt.VariableSpec(shape, np.float32, None if lay is None else Layout(lay, mesh))
             for n, (shape, lay) in SPECS.items()}
    step = shardopt.Adafactor(learning_rate=0.05, weight_decay=0.01, mesh=mesh).compile(specs)
    assert [m.name for p in step.packs for m in p.members] == ["b", "d"]
    params = step.place_params(_values(0))
    state = step.init(params)
    for i in range(STEPS):
        grads = _values(i + 1)
        opt.apply_gradients([(g, variables[n]) for n, g in grads.items()])
        params, state = step(params, grads, state)
    for n, v in variables.items():
        np.testing.assert_array_equal(np.asarray(params[n]), v.numpy(), err_msg=n)
    slots = step.slots(state)
    assert slots["r"]["b"] is None and slots["r"]["w"].shape == (8,)
    saved = step.state_dict(state)
    specs_out = step.state_dict_specs()
    assert sorted(saved) == sorted(specs_out)
    for k, spec in specs_out.items():
        assert saved[k].shape == spec.shape, k
    assert specs_out["c/t"].shape == (2, 8) and specs_out["c/t"].sharding.spec == PartitionSpec(None, "model")
    np.testing.assert_array_equal(np.asarray(saved["r/w"]), opt.get_slot(variables["w"], "r").numpy())
    restored = step.load_state_dict(saved)

    step.save(tmp_path / "adafactor.shardopt")
    loaded = shardopt.load(tmp_path / "adafactor.shardopt", mesh)
    grads = _values(99)
    want, _ = step(params, grads, restored)
    got, _ = loaded(loaded.place_params({n: np.asarray(v) for n, v in variables.items()}), grads,
                    loaded.load_state_dict(opt.state_dict() | {"learning_rate": saved["learning_rate"]}))
    for n in SPECS:
        np.testing.assert_array_equal(np.asarray(got[n]), np.asarray(want[n]), err_msg=n)


def test_update_step_on_factored_and_unfactored_variables(mesh):
    """The public `update_step` (no clipping or counter) takes each variable's own slots."""
    variables = _variables(mesh)
    opt = shardopt.Adafactor(learning_rate=0.05, mesh=mesh)
    ref = {n: shardopt.Variable(v.numpy(), name=n, layout=v.layout) for n, v in variables.items()}
    other = shardopt.Adafactor(learning_rate=0.05, mesh=mesh)
    opt.build([variables["w"], variables["b"]])
    grads = _values(1)
    for n in ("w", "b"):
        opt.update_step(grads[n], variables[n])
    other.apply_gradients([(grads[n], ref[n]) for n in ("w", "b")])
    for n in ("w", "b"):
        np.testing.assert_allclose(variables[n].numpy(), ref[n].numpy(), rtol=1e-6, err_msg=n)
        np.testing.assert_allclose(opt.get_slot(variables[n], "v").numpy(), other.get_slot(ref[n], "v").numpy(),
                                   rtol=1e-6)


def _entry(**kw) -> StepEntry:
    base = dict(name="w", shape=(6, 8), dtype="float32", layout=(None, "model"), slots=("r", "c", "v"),
                slot_shapes=(("r", (6,)), ("c", (8,))), slot_layouts=(("r", (None,)), ("c", ("model",))))
    return StepEntry(**(base | kw))


def test_propagate_layouts_checks_factored_slot_layouts(mesh):
    opt = shardopt.Adafactor()
    compile_step(opt, [_entry()], mesh)  # pinned and divisible: fine
    with pytest.raises(PassError, match="r/w: a slot of shape \\[6\\] for variable w .* needs its layout pinned"):
        compile_step(opt, [_entry(slot_layouts=())], mesh)
    with pytest.raises(ValueError, match="slot 'r' of 'w' .*dimension 0 of size 6 is not divisible by mesh axis "
                       "model of size 4"):
        compile_step(opt, [_entry(slot_layouts=(("r", ("model",)), ("c", ("model",))))], mesh)


def test_passes_leave_what_reads_its_own_reductions(mesh):
    """Adafactor's `u / max(1, rms(u))` reduces the update it scales: fuse-moments leaves such packed members
    unfused (one packed chain could not read a norm of itself), and fuse-clipping never batches the rms of the
    update with the global norm it depends on; both used to emit invalid IR."""
    b, d = (shardopt.Variable(np.ones(n, np.float32), name=name) for name, n in (("b", 12), ("d", 3)))
    w = shardopt.Variable(np.ones((8, 4), np.float32), name="w")  # replicated: its sums of squares batch
    grads = [(np.ones(12, np.float32), b), (np.ones(3, np.float32), d), (np.full((8, 4), 2, np.float32), w)]
    opt = shardopt.Adafactor(global_clipnorm=1.0, use_ema=True, ema_overwrite_frequency=2, mesh=mesh)
    program = opt.program_for(grads)
    assert [m.name for p in opt.packs for m in p.members] == ["b", "d"]
    fused = program.pipeline.stage("fuse-moments").stats
    assert fused["results_unfused"].get("a leaf reduces the update itself") == 6  # variable, v, average of b, d
    clip = program.pipeline.stage("fuse-clipping").stats
    assert clip["sums_of_squares"] > 0  # the rms(u) of b, d and w read the global norm: never batched with it
    for _ in range(3):
        opt.apply_gradients(grads)
    assert np.isfinite(b.numpy()).all() and float(abs(b.numpy() - 1).max()) > 0
