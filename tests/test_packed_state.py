"""Packed optimizer state (frontend/packing.py, frontend/packed_state.py): which variables pack, trajectories
bitwise equal to one buffer per variable under every option, variables and slots as views (read, assign,
partial gradients, EMA finalize), and nothing lost when a step is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fusion_testlib import adam

import shardopt
from shardopt import UNSHARDED, IndexedSlices, Layout
from shardopt.core.packing import PACK_MAX_ELEMENTS, PACK_MAX_MEMBERS, plan_packs

AXES = {"batch": 2, "model": 4}


def test_plan_packs_groups_by_dtype_and_layout():
    variables = [
        ("a", (8,), "float32", (None,)), ("b", (2, 3), "float32", (None, None)),      # flat f32
        ("c", (8, 4), "float32", ("model", None)), ("d", (16,), "float32", ("model",)),  # rows over model
        ("e", (4, 8), "float32", (None, "model")),                                      # dim 1: stays loose
        ("f", (3,), "bfloat16", (None,)), ("g", (5,), "bfloat16", (None,)),             # flat bf16
        ("h", (PACK_MAX_ELEMENTS + 1,), "float32", (None,)),                            # too big: loose
        ("i", (6,), "float32", ("model",)),                                             # 6 % 4: loose
        ("j", (7,), "float16", (None,)),                                                # alone: loose
    ]
    packs = plan_packs(variables, AXES)
    assert [[m.name for m in p.members] for p in packs] == [["a", "b"], ["c", "d"], ["f", "g"]]
    flat, rows, half = packs
    assert flat.shape == (14,) and flat.layout == (None,) and [m.offset for m in flat.members] == [0, 8]
    assert rows.shape == (4, 12) and rows.layout == ("model", None) and [m.offset for m in rows.members] == [0, 8]
    assert half.dtype == "bfloat16" and half.shape == (8,)


def test_plan_packs_splits_a_bucket_of_many_variables_into_near_equal_packs():
    flat = [(f"f{i}", (4,), "float32", (None,)) for i in range(300)]
    rows = [(f"r{i}", (8,), "float32", ("model",)) for i in range(129)]
    packs = plan_packs(flat + rows, AXES, max_members=128)
    assert [len(p.members) for p in packs] == [100, 100, 100, 65, 64]
    assert [m.name for p in packs[:3] for m in p.members] == [n for n, *_ in flat]  # order kept, none lost
    assert [m.offset for m in packs[1].members[:2]] == [0, 4]  # each pack is a buffer of its own
    assert len({p.name for p in packs}) == len(packs)
    assert max(len(p.members) for p in plan_packs(flat, AXES)) <= PACK_MAX_MEMBERS
    assert [len(p.members) for p in plan_packs(flat[:129], AXES, max_members=128)] == [65, 64]  # never one alone


def test_pack_and_unpack_are_inverse():
    (group,) = plan_packs([("a", (8, 4), "float32", ("model", None)), ("b", (16,), "float32", ("model",))], AXES)
    a, b = np.arange(32, dtype=np.float32).reshape(8, 4), np.arange(16, dtype=np.float32) + 100
    packed = group.pack([a, b])
    assert packed.shape == (4, 12)
    np.testing.assert_array_equal(packed[1, :8], a[2:4].ravel())  # row k is device k's block of a
    np.testing.assert_array_equal(group.unpack(packed, 0), a)
    np.testing.assert_array_equal(group.unpack(packed, 1), b)


def _variables(mesh, dtype=np.float32):
    rng = np.random.default_rng(0)

    def var(name, shape, layout):
        return shardopt.Variable(rng.normal(size=shape).astype(dtype), name=name,
                                 layout=None if layout is None else Layout(layout, mesh))
    return [
        var("rows0", (8, 4), ["model", UNSHARDED]), var("rows1", (16,), ["model"]),
        var("flat0", (3, 5), None), var("flat1", (7,), None), var("emb", (6, 4), None),
        var("loose", (4, 8), ["batch", "model"]), var("big", (PACK_MAX_ELEMENTS + 4,), None),
    ]


def _grads(variables, rng, dtype=np.float32):
    out = []
    for v in variables:
        if v.name == "emb":  # sparse rows with a duplicate, into a packed variable
            out.append(IndexedSlices(jnp.asarray(rng.normal(size=(3, 4)).astype(dtype)), jnp.asarray([1, 4, 1])))
        else:
            out.append(jnp.asarray(rng.normal(size=v.shape).astype(dtype)))
    return out


def _trajectory(mesh, packed, steps=4, dtype=np.float32, **kwargs):
    variables = _variables(mesh, dtype)
    opt = adam(mesh, packed=packed, learning_rate=0.01, **kwargs)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        opt.apply_gradients(zip(_grads(variables, rng, dtype), variables, strict=True))
    return [np.asarray(v.value) for v in variables] + [np.asarray(s.value) for s in opt.variables], opt


OPTIONS = {
    "plain": {},
    "global_clipnorm": dict(global_clipnorm=0.5),
    "clipnorm": dict(clipnorm=0.5),
    "everything": dict(amsgrad=True, use_ema=True, ema_overwrite_frequency=2, weight_decay=0.01, clipvalue=0.5),
}


@pytest.mark.parametrize("key", list(OPTIONS))
def test_packed_trajectory_equals_unpacked(mesh, key):
    """4 steps on the 2x4 mesh, row- and flat-packed members (one with sparse gradients), loose ones beside them:
    the same numbers as one buffer per variable (bitwise, except per-tensor clipnorm: XLA turns a division by a
    per-variable broadcast scalar into a multiplication only when the divisor is not packed)."""
    packed, opt = _trajectory(mesh, True, **OPTIONS[key])
    unpacked, ref = _trajectory(mesh, False, **OPTIONS[key])
    assert [[m.name for m in p.members] for p in opt._packed.packs] == [["rows0", "rows1"], ["flat0", "flat1", "emb"]]
    assert ref._packed.packs == ()
    (program, *_), = opt._fast_programs.values()
    stats = program.pipeline.stage("fuse-moments").stats
    # where the kernels are built, the row pack (dense gradients) is one per-device pack kernel call instead
    kernel_packs = program.pipeline.stage("lower-to-kernels").stats.get("packs_lowered", 0)
    assert stats["groups"] + kernel_packs == 2 and stats["pack_copies_folded"] > 0, stats
    for x, y in zip(packed, unpacked, strict=True):
        if key == "clipnorm":
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(x, y)


def test_packed_half_precision_equals_unpacked(mesh):
    packed, _ = _trajectory(mesh, True, dtype=jnp.bfloat16, global_clipnorm=1.0)
    unpacked, _ = _trajectory(mesh, False, dtype=jnp.bfloat16, global_clipnorm=1.0)
    for x, y in zip(packed, unpacked, strict=True):
        np.testing.assert_array_equal(x.view(np.uint16) if x.dtype.itemsize == 2 else x,
                                      y.view(np.uint16) if y.dtype.itemsize == 2 else y)


def test_views_read_assign_and_layouts(mesh):
    variables = _variables(mesh)
    opt = adam(mesh, learning_rate=0.01)
    rng = np.random.default_rng(3)
    opt.apply_gradients(zip(_grads(variables, rng), variables, strict=True))
    rows0 = variables[0]
    # Variables stay the user's own arrays (reading one is free); their slots are views of the packs.
    assert all(v._view is None for v in variables)
    assert rows0.sharding.spec == jax.sharding.PartitionSpec("model", None)
    assert rows0.value.sharding.is_equivalent_to(rows0.sharding, 2)
    before = np.asarray(rows0.value)
    rows0.assign(np.full((8, 4), 2.0, np.float32))
    np.testing.assert_array_equal(rows0.numpy(), 2.0)
    m = opt.get_slot(rows0, "m")
    assert m._view is not None and m.shape == (8, 4) and opt.get_slot(variables[5], "m")._view is None
    assert m.value.sharding.spec == jax.sharding.PartitionSpec("model", None)
    neighbour = opt.get_slot(variables[1], "m").numpy()  # rows1's m shares rows0's m buffer
    m.assign(np.zeros((8, 4), np.float32))
    np.testing.assert_array_equal(opt.get_slot(variables[1], "m").numpy(), neighbour)  # the rest is untouched
    opt.apply_gradients([(jnp.ones((8, 4), jnp.float32), rows0)])  # a gradient for one member only
    after = rows0.numpy()
    assert not np.array_equal(after, 2.0) and not np.array_equal(after, before)
    np.testing.assert_allclose(opt.get_slot(rows0, "m").numpy(), 0.1, rtol=1e-6)  # from zero: (1 - beta_1) * 1
    with pytest.raises(ValueError, match="shape"):
        rows0.assign(np.zeros((4, 8), np.float32))
    with pytest.raises(RuntimeError, match="packed"):
        m.place(Layout.replicated(mesh, 2))


def test_partial_gradients_leave_other_members_alone(mesh):
    variables = _variables(mesh)
    opt = adam(mesh, learning_rate=0.01)
    rng = np.random.default_rng(4)
    opt.apply_gradients(zip(_grads(variables, rng), variables, strict=True))
    snapshot = {v.name: v.numpy() for v in variables}
    slots = {v.name: opt.get_slot(v, "m").numpy() for v in variables}
    opt.apply_gradients([(jnp.ones(7, jnp.float32), variables[3])])  # flat1 only
    for v in variables:
        if v.name != "flat1":
            np.testing.assert_array_equal(v.numpy(), snapshot[v.name])
            np.testing.assert_array_equal(opt.get_slot(v, "m").numpy(), slots[v.name])
    assert not np.array_equal(variables[3].numpy(), snapshot["flat1"])


def test_finalize_ema_and_update_step_on_views(mesh):
    variables = _variables(mesh)[:4]
    opt = adam(mesh, learning_rate=0.01, use_ema=True)
    rng = np.random.default_rng(5)
    for _ in range(3):
        opt.apply_gradients(zip(_grads(variables, rng), variables, strict=True))
    averages = [opt.get_slot(v, "average").numpy() for v in variables]
    opt.finalize_variable_values(variables)
    for v, avg in zip(variables, averages, strict=True):
        np.testing.assert_array_equal(v.numpy(), avg)
    before = variables[2].numpy()
    opt.update_step(jnp.ones((3, 5), jnp.float32), variables[2])
    assert not np.array_equal(variables[2].numpy(), before)


def test_refused_step_loses_nothing(mesh):
    """Bad gradients are refused before anything is donated: packed buffers and their views are intact."""
    variables = _variables(mesh)
    opt = adam(mesh, learning_rate=0.01)
    rng = np.random.default_rng(6)
    opt.apply_gradients(zip(_grads(variables, rng), variables, strict=True))
    snapshot = [v.numpy() for v in variables] + [s.numpy() for s in opt.variables]
    for k, bad in [(0, jnp.ones((8, 4), jnp.float16)), (3, jnp.ones((5,), jnp.float32))]:
        grads = _grads(variables, rng)
        grads[k] = bad
        with pytest.raises((TypeError, ValueError)):
            opt.apply_gradients(zip(grads, variables, strict=True))
    for x, y in zip([v.numpy() for v in variables] + [s.numpy() for s in opt.variables], snapshot, strict=True):
        np.testing.assert_array_equal(x, y)
    grads = _grads(variables, rng)
    grads[2] = variables[2].value  # the variable's own (donated) array as its gradient: refused, nothing lost
    with pytest.raises(ValueError, match="donated"):
        opt.apply_gradients(zip(grads, variables, strict=True))
    grads[2] = variables[2].value + 0  # a copy is a valid gradient
    opt.apply_gradients(zip(grads, variables, strict=True))
    assert np.isfinite(variables[2].numpy()).all()


def test_two_optimizers_share_variables(mesh):
    """Two optimizers updating the same variables each pack their own slots; the variables stay one value
    (the user's arrays), exactly as without packing."""
    def run(packed):
        variables = _variables(mesh)[:4]
        first = adam(mesh, packed=packed, learning_rate=0.01)
        second = adam(mesh, packed=packed, learning_rate=0.1, amsgrad=True)
        rng = np.random.default_rng(7)
        for step in range(4):
            opt = first if step % 2 == 0 else second
            opt.apply_gradients(zip(_grads(variables, rng), variables, strict=True))
        assert bool(first.packs) == bool(second.packs) == packed
        return [v.numpy() for v in variables]
    for x, y in zip(run(True), run(False), strict=True):
        np.testing.assert_array_equal(x, y)
