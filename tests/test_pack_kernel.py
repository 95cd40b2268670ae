"""The multi-tensor pack kernel: a pack's whole Adam update (packed slots, the members' own variables and
gradients as separate operands) is one in-place custom call (`shardopt_adam_pack_update`), chosen by
`lower-to-kernels` from the frontend's `shardopt.adam_pack` composite (frontend/pack_kernel.py).

Bitwise equal to the pipeline with the pass off (the composite inlined, then fused by fuse-moments) over several
steps for every option the kernel takes, float32 and bfloat16, global clip norm included: both paths sum the
pack's squares in one fixed order (passes/fixed_order_norm.py), the kernel path with one `shardopt_sumsq` call.
The gradient gather disappears from the compiled HLO.
"""

import re

import ml_dtypes  # noqa: F401  (numpy bfloat16)
import numpy as np
import pytest

import shardopt
from shardopt import kernels as sk
from shardopt.passes.pipeline import DEFAULT_PIPELINE

PASS = "lower-to-kernels"
OFF = tuple("lower-to-kernels{enabled=false}" if p == PASS else p for p in DEFAULT_PIPELINE)
SHAPES = [(37,), (10, 20), (5,), (64,), (3, 3, 3)]
CONFIGS = {
    "plain": {},
    "amsgrad": {"amsgrad": True},
    "weight_decay": {"weight_decay": 0.05},
    "clipnorm": {"clipnorm": 0.3},
    "clipvalue": {"clipvalue": 0.2},
    "schedule": {"learning_rate": shardopt.schedules.ExponentialDecay(1e-2, 3, 0.5)},
}


def bits(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def run(dtype, options, pipeline, steps=6):
    rng = np.random.default_rng(1)
    vs = [shardopt.Variable(rng.standard_normal(s).astype(dtype), name=f"v{i}") for i, s in enumerate(SHAPES)]
    opt = shardopt.Adam(**{"learning_rate": 1e-2, **options})
    opt.pipeline = pipeline
    for _ in range(steps):
        opt.apply_gradients([(rng.standard_normal(s).astype(np.float32).astype(dtype), v)
                             for s, v in zip(SHAPES, vs, strict=True)])
    program = next(iter(opt._programs.values()))
    return [np.asarray(v.value) for v in vs], program


def test_library_has_the_pack_kernel():
    assert sk.available("adam_pack"), sk.reason("adam_pack")


@pytest.mark.parametrize("dtype", [np.float32, np.dtype("bfloat16")], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("key", list(CONFIGS))
def test_bitwise_equal_to_the_fused_stablehlo_path(key, dtype):
    with_kernel, program = run(dtype, CONFIGS[key], DEFAULT_PIPELINE)
    without, off_program = run(dtype, CONFIGS[key], OFF)
    stats = program.pipeline.stage(PASS).stats
    assert stats["packs_lowered"] == 1 and stats["pack_members"] == len(SHAPES), stats
    assert stats["gradient_buffers_freed"] == 1
    assert off_program.pipeline.stage(PASS).stats.get("packs_lowered", 0) == 0  # the reference: StableHLO
    for x, y in zip(with_kernel, without, strict=True):
        np.testing.assert_array_equal(bits(x), bits(y))


CLIP_CONFIGS = {
    "global_clipnorm": {"global_clipnorm": 0.5},
    "global_clipnorm_amsgrad_wd": {"global_clipnorm": 0.5, "amsgrad": True, "weight_decay": 0.05},
}


@pytest.mark.parametrize("dtype", [np.float32, np.dtype("bfloat16")], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("key", list(CLIP_CONFIGS))
def test_global_clipnorm_bitwise_equal_to_the_portable_path(key, dtype):
    """The norm over the pack is one `shardopt_sumsq` call on the kernel path and the same fixed order written in
    StableHLO on the portable one (passes/fixed_order_norm.py): the scale, and every step after it, agree bit for
    bit (before the fixed order they differed by a few ulp)."""
    with_kernel, program = run(dtype, CLIP_CONFIGS[key], DEFAULT_PIPELINE)
    without, off_program = run(dtype, CLIP_CONFIGS[key], OFF)
    stats = program.pipeline.stage(PASS).stats
    assert stats["scales_folded"] == 1 and stats["norms_lowered"] == 1, stats
    assert stats["kernels"]["shardopt_sumsq"] == 1
    assert off_program.pipeline.stage("fuse-clipping").stats["packed_gradient_norms"] == 1
    for x, y in zip(with_kernel, without, strict=True):
        np.testing.assert_array_equal(bits(x), bits(y))


def test_compiled_hlo_is_one_custom_call_without_the_gather():
    _, program = run(np.float32, {}, DEFAULT_PIPELINE, steps=1)
    hlo = program.executable.lower().compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    calls = [line for line in entry.splitlines() if "custom-call(" in line]
    assert len(calls) == 1 and 'custom_call_target="shardopt_adam_pack_update"' in calls[0], calls
    # nothing else writes a pack-sized buffer: no gradient gather, no copy of the packed slots
    assert not re.search(r"= f32\[333\]\S* (concatenate|fusion|copy)\(", entry), entry


def test_many_variables_are_several_calls_of_at_most_pack_max_members():
    """XLA:CPU's compile time grows faster than linearly with one call's operands (core/packing.py
    PACK_MAX_MEMBERS): 300 variables become 3 packs, 3 kernel calls of 100 variables each."""
    from shardopt.core.packing import PACK_MAX_MEMBERS

    count = 300
    assert count > 2 * PACK_MAX_MEMBERS
    vs = [shardopt.Variable(np.full((4,), 0.5, np.float32), name=f"v{i}") for i in range(count)]
    opt = shardopt.Adam(1e-2)
    opt.apply_gradients([(np.ones((4,), np.float32), v) for v in vs])
    program = next(iter(opt._programs.values()))
    stats = program.pipeline.stage(PASS).stats
    assert stats["packs_lowered"] == 3 and stats["pack_members"] == count, stats
    assert stats["gradient_buffers_freed"] == 3
    calls = re.findall(r"stablehlo.custom_call @shardopt_adam_pack_update\((.*?)\)", program.pipeline.final_text)
    assert len(calls) == 3 and all(c.count("%") <= 2 * PACK_MAX_MEMBERS + 4 for c in calls)
    reference = 0.5 - 1e-2 * np.ones(4, np.float32)  # Adam's first step moves each weight by about lr
    np.testing.assert_allclose(np.asarray(vs[-1].value), reference, rtol=1e-4)


def test_pack_member_cap_only_where_packs_become_kernel_calls():
    """Without a pack kernel (RMSprop here) XLA's fused StableHLO step is faster in one pack (from_optax's adam on
    2000 x f32[3700]: 30 ms in one pack, 79 ms in 16), so the cap applies only to Adam/SGD with the library."""
    from shardopt.core.packing import PACK_MAX_MEMBERS

    count = PACK_MAX_MEMBERS + 72
    for cls, packs in ((shardopt.RMSprop, 1), (shardopt.Adam, 2)):
        vs = [shardopt.Variable(np.full((4,), 0.5, np.float32), name=f"v{i}") for i in range(count)]
        opt = cls(1e-2)
        opt.apply_gradients([(np.ones((4,), np.float32), v) for v in vs])
        assert len(opt.packs) == packs and sum(len(p.members) for p in opt.packs) == count, cls


def test_not_lowered_when_a_member_has_no_gradient_or_a_sparse_one():
    rng = np.random.default_rng(0)
    vs = [shardopt.Variable(rng.standard_normal(s).astype(np.float32), name=f"v{i}") for i, s in enumerate(SHAPES)]
    opt = shardopt.Adam(1e-2)
    opt.apply_gradients([(np.ones(s, np.float32), v) for s, v in zip(SHAPES, vs, strict=True)])
    opt.apply_gradients([(np.ones(s, np.float32), v) for s, v in zip(SHAPES[1:], vs[1:], strict=True)])
    sparse = shardopt.IndexedSlices(np.ones((1, 20), np.float32), np.array([3], np.int32), (10, 20))
    opt.apply_gradients([(np.ones(SHAPES[0], np.float32), vs[0]), (sparse, vs[1])] +
                        [(np.ones(s, np.float32), v) for s, v in zip(SHAPES[2:], vs[2:], strict=True)])
    lowered = [p.pipeline.stage(PASS).stats.get("packs_lowered", 0) for p in opt._programs.values()]
    assert lowered[0] == 1 and lowered[1:] == [0] * (len(lowered) - 1), lowered


def test_kernel_refuses_mismatched_operands():
    import jax.numpy as jnp

    m = jnp.zeros((10,), jnp.float32)
    with pytest.raises(ValueError, match="one variable per gradient"):
        sk.adam_pack_update([jnp.ones((4,))], m, m, [jnp.ones((4,)), jnp.ones((6,))], alpha=1e-3, eps=1e-7,
                            beta_1=0.9, beta_2=0.999)
    with pytest.raises(ValueError, match="gradients hold"):
        sk.adam_pack_update([jnp.ones((4,))], m, m, [jnp.ones((4,))], alpha=1e-3, eps=1e-7, beta_1=0.9,
                            beta_2=0.999)
