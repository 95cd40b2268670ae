"""The compiled update kernels (shardopt/kernels): numerics against shardopt's StableHLO formulation, in-place
updates, and the fallback reports when the library is missing.

No skips: CI has a C++ compiler, so a kernel that was not built is a failure here (`test_library_is_built`).

Numerics: the reference is shardopt's own update (`_update_entry` order: clip scale, weight decay, then the
definition's `update_dense`) jitted by XLA:CPU. On this CPU (AVX2+FMA) the kernel's FMA loops must match it
bitwise; the baseline loops (for CPUs without FMA, where XLA does not contract) must match the same
formulation evaluated without contraction (numpy float32) bitwise, and XLA's within 1 ulp... of m and v (p can
differ more through cancellation, so it is compared to numpy only).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from shardopt import kernels
from shardopt.kernels import _loader
from shardopt.optimizers.adam import Adam

BF16 = jnp.bfloat16
SIZES = (3 * 5, 70_000, 1, 0, 64_001, 5_000)  # crosses the 65536-element chunks; more than the threaded minimum
LR, T = np.float32(2e-3), np.int32(3)


def bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def ulp_distance(a, b) -> int:
    """Largest distance in units in the last place (float32 or bfloat16, finite values)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype == ml_dtypes.bfloat16:
        a, b = a.view(np.int16).astype(np.int64), b.view(np.int16).astype(np.int64)
        sign = 0x8000
    else:
        a, b = a.view(np.int32).astype(np.int64), b.view(np.int32).astype(np.int64)
        sign = 0x80000000
    # Map sign-magnitude to a monotone integer line.
    a = np.where(a < 0, -(a & (sign - 1)), a)
    b = np.where(b < 0, -(b & (sign - 1)), b)
    return int(np.max(np.abs(a - b))) if a.size else 0


def assert_bitwise(got, want, what: str) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    differ = int(np.sum(bits(got) != bits(want)))
    assert differ == 0, f"{what}: {differ} of {got.size} elements differ, max {ulp_distance(got, want)} ulp"


def make_state(dtype, n, amsgrad, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(np.float32)
    m = (rng.standard_normal(n) * 0.1).astype(np.float32)
    v = (rng.random(n) * 0.01).astype(np.float32)
    state = [p, m, v] + ([(v * rng.uniform(0.5, 2.0, n)).astype(np.float32)] if amsgrad else [])
    grads = [(rng.standard_normal(s) * 0.3).astype(np.float32) for s in SIZES]
    grads[0] = grads[0].reshape(3, 5)
    return ([jnp.asarray(s, dtype) for s in state], [jnp.asarray(g, dtype) for g in grads])


def adam_reference(opt: Adam, p, m, v, vhat, grads, lr, t, scale):
    """shardopt's update for one packed group, as frontend/step.py `_update_entry` orders it."""
    dt = p.dtype
    ct = jnp.float32
    if scale is not None:  # clipping.clip_by_global_norm
        grads = [g * scale.astype(g.dtype) for g in grads]
    g = jnp.concatenate([x.reshape(-1) for x in grads]).astype(ct)
    var = p.astype(ct)
    state = {"m": m.astype(ct), "v": v.astype(ct)}
    if vhat is not None:
        state["vhat"] = vhat.astype(ct)
    if opt.weight_decay is not None:
        var = var - (var * jnp.asarray(np.float32(opt.weight_decay), ct)) * lr
    var, new = opt.update_dense(var, g, state, lr, t)
    out = [var.astype(dt), new["m"].astype(dt), new["v"].astype(dt)]
    return tuple(out + ([new["vhat"].astype(dt)] if vhat is not None else []))


def adam_kernel(opt: Adam, p, m, v, vhat, grads, lr, t, scale):
    alpha, eps = opt._alpha_eps(lr, t, jnp.float32)
    return kernels.adam_update(p, m, v, grads, alpha=alpha, eps=eps, beta_1=opt.beta_1, beta_2=opt.beta_2,
                               vhat=vhat, weight_decay=opt.weight_decay, lr=lr, clip_scale=scale)


ADAM_CASES = {
    "plain": {},
    "amsgrad": {"amsgrad": True},
    "weight_decay": {"weight_decay": 0.01},
    "clip": {"clip": True},
    "all": {"amsgrad": True, "weight_decay": 0.004, "clip": True, "beta_1": 0.8, "beta_2": 0.95, "epsilon": 1e-6},
}


def run_adam(fn, dtype, case):
    case = dict(ADAM_CASES[case])
    clip = case.pop("clip", False)
    opt = Adam(learning_rate=float(LR), **case)
    state, grads = make_state(dtype, sum(SIZES), opt.amsgrad)
    vhat = state[3] if opt.amsgrad else None
    scale = jnp.float32(0.37) if clip else None
    f = jax.jit(lambda p, m, v, vh, gs, lr, t, s: fn(opt, p, m, v, vh, gs, lr, t, s))
    return f(state[0], state[1], state[2], vhat, grads, LR, T, scale)


@pytest.fixture
def isa():
    """Force the kernels' instruction set for one test, restoring it after."""
    lib = _loader.load().lib
    saved = lib.ShardoptKernelsIsa()
    yield lib
    lib.ShardoptKernelsSetIsa(saved)


def test_library_is_built():
    assert kernels.available("adam", "float32"), kernels.reason("adam", "float32")
    assert kernels.available("sgd", "bfloat16"), kernels.reason("sgd", "bfloat16")
    info = kernels.info()
    assert info["loaded"] and info["targets"] == ["shardopt_adam_pack_update", "shardopt_adam_update",
                                                "shardopt_sgd_pack_update", "shardopt_sgd_update", "shardopt_sumsq"]


@pytest.mark.parametrize("dtype", [jnp.float32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(ADAM_CASES))
def test_adam_matches_xla_bitwise(dtype, case, isa):
    if not isa.ShardoptKernelsIsaSupported(1):
        pytest.fail("this test expects a CPU with AVX2+FMA (XLA:CPU contracts multiply-adds there)")
    isa.ShardoptKernelsSetIsa(1)
    got = run_adam(adam_kernel, dtype, case)
    want = run_adam(adam_reference, dtype, case)
    for name, g, w in zip(("p", "m", "v", "vhat")[:len(want)], got, want, strict=True):
        assert_bitwise(g, w, f"{case} {name}")


def numpy_adam(state, grads, c1, c2, alpha, eps, wd, lr, scale):
    """The same order without contraction, in float32 numpy (what XLA computes on a CPU without FMA)."""
    f32 = np.float32
    p, m, v = (np.asarray(s).astype(f32) for s in state[:3])
    g = np.concatenate([np.asarray(x).reshape(-1).astype(f32) for x in grads])
    if scale is not None:  # in the gradient dtype, as clipping.py: `x * scale.astype(x.dtype)`
        gdt = np.asarray(grads[0]).dtype
        g = (g * f32(np.asarray(scale).astype(gdt))).astype(gdt).astype(f32)
    if wd is not None:  # XLA folds the two scalars first
        p = p - p * (f32(lr) * f32(wd))
    m = m + (g - m) * c1
    v = v + (g * g - v) * c2
    vu = np.maximum(np.asarray(state[3]).astype(f32), v) if len(state) == 4 else v
    p = p - (m * f32(alpha)) / (np.sqrt(vu) + f32(eps))
    dt = np.asarray(state[0]).dtype
    return tuple(x.astype(dt) for x in [p, m, v] + ([vu] if len(state) == 4 else []))


@pytest.mark.parametrize("dtype", [jnp.float32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", ["plain", "all"])
def test_adam_baseline_isa_matches_unfused(dtype, case, isa):
    """The loops for CPUs without FMA: bitwise to the uncontracted formulation, m and v within 1 ulp of XLA's."""
    isa.ShardoptKernelsSetIsa(0)
    assert isa.ShardoptKernelsIsa() == 0
    cfg = dict(ADAM_CASES[case])
    clip = cfg.pop("clip", False)
    opt = Adam(learning_rate=float(LR), **cfg)
    state, grads = make_state(dtype, sum(SIZES), opt.amsgrad)
    scale = np.float32(0.37) if clip else None
    alpha, eps = (np.float32(x) for x in jax.jit(lambda: opt._alpha_eps(LR, T, jnp.float32))())
    got = jax.jit(lambda s, gs: kernels.adam_update(
        s[0], s[1], s[2], gs, alpha=alpha, eps=eps, beta_1=opt.beta_1, beta_2=opt.beta_2,
        vhat=s[3] if opt.amsgrad else None, weight_decay=opt.weight_decay, lr=LR, clip_scale=scale))(state, grads)
    want = numpy_adam(state, grads, np.float32(1 - opt.beta_1), np.float32(1 - opt.beta_2), alpha, eps,
                      opt.weight_decay, LR, scale)
    for name, g, w in zip(("p", "m", "v", "vhat")[:len(want)], got, want, strict=True):
        assert_bitwise(g, w, f"baseline {case} {name}")
    # Against XLA (which contracts on this CPU): m and v differ only by the roundings of the products that
    # XLA fuses, at most a float32 ulp of the terms summed (cancellation can make that many ulps of the result);
    # a bfloat16 result one bfloat16 ulp more.
    xla = run_adam(adam_reference, dtype, case)
    g = np.concatenate([np.asarray(x).reshape(-1).astype(np.float32) for x in grads])
    for i, c in ((1, np.float32(1 - opt.beta_1)), (2, np.float32(1 - opt.beta_2))):
        old = np.asarray(state[i]).astype(np.float32)
        term = np.abs(old) + np.abs((g * g if i == 2 else g) - old) * c + np.abs(g * g if i == 2 else g) * c
        got_i, xla_i = np.asarray(got[i]).astype(np.float32), np.asarray(xla[i]).astype(np.float32)
        allowed = term * np.float32(2.0**-23)
        if np.asarray(got[i]).dtype != np.float32:  # plus one bfloat16 spacing of the rounded result
            allowed = allowed + np.spacing(np.abs(xla_i)) * np.float32(2.0**16)
        assert np.all(np.abs(got_i - xla_i) <= allowed), i


def sgd_reference(p, m, grads, lr, momentum, nesterov, wd, scale, scale_float32=False):
    """tf-keras SGD (optimizers/sgd.py, dense) in shardopt's order: clip scale, weight decay, update. The scale
    multiplies in the gradient dtype (clipping.py), or with `scale_float32` the float32 gradient (a step)."""
    dt, ct = p.dtype, jnp.float32
    if scale is not None:
        grads = [g.astype(ct) * scale if scale_float32 else g * scale.astype(g.dtype) for g in grads]
    g = jnp.concatenate([x.reshape(-1) for x in grads]).astype(ct)
    var, mc = p.astype(ct), m.astype(ct)
    if wd is not None:
        var = var - (var * jnp.asarray(np.float32(wd), ct)) * lr
    mom = jnp.asarray(np.float32(momentum), ct)
    mc = -g * lr + mc * mom
    var = var + (-g * lr + mc * mom) if nesterov else var + mc
    return var.astype(dt), mc.astype(dt)


SGD_CASES = {
    "momentum": {},
    "nesterov": {"nesterov": True},
    "weight_decay": {"wd": 0.01},
    "clip_nesterov_wd": {"nesterov": True, "wd": 0.003, "clip": True},
    "zero_momentum": {"momentum": 0.0},
}
# The clip scale as a step applies it (float32 product, contracted as XLA:CPU compiles a step's loop): its XLA
# reference is the step itself (tests/test_sgd_kernel.py); here only against the uncontracted formulation.
SGD_STEP_FORM = {"clip_float32": {"nesterov": True, "wd": 0.003, "clip": True, "float32": True}}


def _sgd_case(case):
    cfg = {**SGD_CASES, **SGD_STEP_FORM}[case]
    return dict(momentum=cfg.get("momentum", 0.9), nesterov=cfg.get("nesterov", False), wd=cfg.get("wd"),
                scale=jnp.float32(0.61) if cfg.get("clip") else None, scale_float32=cfg.get("float32", False))


def _split(p, grads):
    """p cut into one buffer per gradient, of its shape (a pack's variables)."""
    out, at = [], 0
    for g in grads:
        out.append(p[at:at + g.size].reshape(g.shape))
        at += g.size
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_matches_xla_bitwise(dtype, case, isa):
    """The single-buffer and the pack kernel (each gradient's variable in a buffer of its own) against XLA."""
    isa.ShardoptKernelsSetIsa(1)
    c = _sgd_case(case)
    options = dict(momentum=c["momentum"], nesterov=c["nesterov"], weight_decay=c["wd"],
                   scale_float32=c["scale_float32"])
    state, grads = make_state(dtype, sum(SIZES), False, seed=1)
    p, m = state[0], state[1]
    got = jax.jit(lambda p, m, gs, lr, s: kernels.sgd_update(p, m, gs, lr=lr, clip_scale=s, **options))(
        p, m, grads, LR, c["scale"])
    want = jax.jit(lambda p, m, gs, lr, s: sgd_reference(p, m, gs, lr, c["momentum"], c["nesterov"], c["wd"], s,
                                                         c["scale_float32"]))(p, m, grads, LR, c["scale"])
    for name, g, w in zip(("p", "m"), got, want, strict=True):
        assert_bitwise(g, w, f"sgd {case} {name}")
    ps, m_pack = jax.jit(lambda ps, m, gs, lr, s: kernels.sgd_pack_update(ps, m, gs, lr=lr, clip_scale=s,
                                                                           **options))(
        _split(p, grads), m, grads, LR, c["scale"])
    assert [x.shape for x in ps] == [g.shape for g in grads]
    assert_bitwise(jnp.concatenate([x.reshape(-1) for x in ps]), want[0], f"sgd pack {case} p")
    assert_bitwise(m_pack, want[1], f"sgd pack {case} m")


def numpy_sgd(p, m, grads, lr, momentum, nesterov, wd, scale, scale_float32):
    """SGD in shardopt's order without contraction, in float32 numpy (XLA on a CPU without FMA)."""
    f32 = np.float32
    g = np.concatenate([np.asarray(x).reshape(-1).astype(f32) for x in grads])
    if scale is not None:
        gdt = f32 if scale_float32 else np.asarray(grads[0]).dtype
        g = (g * f32(np.asarray(scale).astype(gdt))).astype(gdt).astype(f32)
    p, m = np.asarray(p).astype(f32), np.asarray(m).astype(f32)
    if wd is not None:
        p = p - p * (f32(lr) * f32(wd))
    step = -g * f32(lr)
    m = step + m * f32(momentum)
    p = p + (step + m * f32(momentum)) if nesterov else p + m
    return p, m


@pytest.mark.parametrize("dtype", [jnp.float32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", ["nesterov", "clip_nesterov_wd", "clip_float32"])
def test_sgd_baseline_isa_matches_unfused(dtype, case, isa):
    """The loops for CPUs without FMA: bitwise the uncontracted formulation, single-buffer and pack kernel."""
    isa.ShardoptKernelsSetIsa(0)
    c = _sgd_case(case)
    options = dict(momentum=c["momentum"], nesterov=c["nesterov"], weight_decay=c["wd"],
                   scale_float32=c["scale_float32"])
    state, grads = make_state(dtype, sum(SIZES), False, seed=3)
    p, m = state[0], state[1]
    want = [x.astype(np.asarray(p).dtype) for x in numpy_sgd(p, m, grads, LR, c["momentum"], c["nesterov"],
                                                              c["wd"], c["scale"], c["scale_float32"])]
    got = jax.jit(lambda p, m, gs: kernels.sgd_update(p, m, gs, lr=LR, clip_scale=c["scale"], **options))(
        p, m, grads)
    ps, m_pack = jax.jit(lambda ps, m, gs: kernels.sgd_pack_update(ps, m, gs, lr=LR, clip_scale=c["scale"],
                                                                   **options))(_split(p, grads), m, grads)
    pack = (jnp.concatenate([x.reshape(-1) for x in ps]), m_pack)
    for what, result in (("single", got), ("pack", pack)):
        for name, g, w in zip(("p", "m"), result, want, strict=True):
            assert_bitwise(g, w, f"baseline sgd {what} {case} {name}")


def test_sgd_pack_update_is_one_custom_call_in_place():
    ps = [jnp.full((1000,), 0.5, jnp.float32), jnp.full((3, 1032), 0.25, jnp.float32)]
    m = jnp.zeros(4096, jnp.float32)
    grads = [jnp.ones((1000,), jnp.float32), jnp.ones((3, 1032), jnp.float32)]

    def step(ps, m, grads, lr):
        return kernels.sgd_pack_update(ps, m, grads, lr=lr, momentum=0.9, nesterov=True, weight_decay=0.01,
                                       clip_scale=jnp.float32(0.5))

    f = jax.jit(step, donate_argnums=(0, 1))
    hlo = f.lower(ps, m, grads, LR).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    assert len(re.findall(r"custom-call\(", entry)) == 1, entry
    assert not re.findall(r"\bcopy(-start)?\(", entry), entry
    pointers = [x.unsafe_buffer_pointer() for x in ps] + [m.unsafe_buffer_pointer()]
    new_ps, new_m = f(ps, m, grads, LR)
    assert [x.unsafe_buffer_pointer() for x in new_ps] + [new_m.unsafe_buffer_pointer()] == pointers
    assert all(x.is_deleted() for x in ps) and m.is_deleted()


def test_sgd_pack_kernel_rejects_inconsistent_operands():
    """A pack call whose variables do not match its gradients is an error from the kernel, not a crash."""
    call = kernels.sgd_pack_call(1, momentum=0.9)
    m = jnp.zeros(10, jnp.float32)
    fn = jax.ffi.ffi_call(call.target, [jax.ShapeDtypeStruct(m.shape, m.dtype), jax.ShapeDtypeStruct((4,), m.dtype)],
                          input_output_aliases=call.aliases)
    with pytest.raises(Exception, match="variable 0 must have its gradient's element count"):
        jax.block_until_ready(jax.jit(lambda: fn(m, jnp.float32(1), jnp.zeros(4), jnp.zeros(10),
                                                 **call.attributes))())
    with pytest.raises(ValueError, match="one variable per gradient"):
        kernels.sgd_pack_update([jnp.ones((4,))], m, [jnp.ones((4,)), jnp.ones((6,))], lr=0.1, momentum=0.9)


def test_many_small_gradients_and_several_steps(isa):
    """2000 gradients of 64 elements (the many-tensors shape), three steps feeding the state forward."""
    isa.ShardoptKernelsSetIsa(1)
    opt = Adam(learning_rate=float(LR), amsgrad=True)
    rng = np.random.default_rng(2)
    n = 2000 * 64
    z = jnp.zeros(n, jnp.float32)
    ref_state = ker_state = (jnp.asarray(rng.standard_normal(n).astype(np.float32)), z, z, z)
    ref = jax.jit(lambda s, gs, t: adam_reference(opt, *s, gs, LR, t, None))
    ker = jax.jit(lambda s, gs, t: adam_kernel(opt, *s, gs, LR, t, None))
    for step in range(1, 4):
        grads = [jnp.asarray(rng.standard_normal(64).astype(np.float32)) for _ in range(2000)]
        ref_state = ref(ref_state, grads, np.int32(step))
        ker_state = ker(ker_state, grads, np.int32(step))
    for name, g, w in zip(("p", "m", "v", "vhat"), ker_state, ref_state, strict=True):
        assert_bitwise(g, w, name)


def test_denormals_flush_as_xla(isa):
    """XLA:CPU runs with flush-to-zero and denormals-are-zero; so do the kernels."""
    isa.ShardoptKernelsSetIsa(1)
    opt = Adam(learning_rate=float(LR))
    tiny = np.array([1e-40, -3e-39, 1e-45, 2e-38, 0.0, 1.0], np.float32)
    p, m, v = (jnp.asarray(tiny) for _ in range(3))
    grads = [jnp.asarray(tiny * np.float32(0.5))]
    got = jax.jit(lambda p, m, v, gs: adam_kernel(opt, p, m, v, None, gs, LR, T, None))(p, m, v, grads)
    want = jax.jit(lambda p, m, v, gs: adam_reference(opt, p, m, v, None, gs, LR, T, None))(p, m, v, grads)
    for name, g, w in zip(("p", "m", "v"), got, want, strict=True):
        assert_bitwise(g, w, name)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_donated_update_is_one_custom_call_in_place(amsgrad):
    opt = Adam(learning_rate=float(LR), amsgrad=amsgrad, weight_decay=0.01)
    n = 4096
    state = [jnp.full(n, 0.5, jnp.float32) for _ in range(4 if amsgrad else 3)]
    grads = [jnp.ones(1000, jnp.float32), jnp.ones((3, 1032), jnp.float32)]

    def step(state, grads, lr, t):
        vhat = state[3] if amsgrad else None
        return adam_kernel(opt, state[0], state[1], state[2], vhat, grads, lr, t, jnp.float32(0.5))

    f = jax.jit(step, donate_argnums=(0,))
    hlo = f.lower(state, grads, LR, T).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    assert len(re.findall(r"custom-call\(", entry)) == 1, entry
    assert not re.findall(r"\bcopy(-start)?\(", entry), entry
    assert len(re.findall(r"\{\d+\}: \(\d+, \{\}, may-alias\)", hlo)) == len(state), hlo[:600]
    pointers = [s.unsafe_buffer_pointer() for s in state]
    out = f(state, grads, LR, T)
    assert [o.unsafe_buffer_pointer() for o in out] == pointers
    assert all(s.is_deleted() for s in state)


def test_kernel_rejects_inconsistent_operands():
    """A call whose gradients do not cover the state is an error from the kernel, not a crash."""
    call = kernels.adam_call(beta_1=0.9, beta_2=0.999)
    p = jnp.zeros(10, jnp.float32)
    fn = jax.ffi.ffi_call(call.target, [jax.ShapeDtypeStruct(p.shape, p.dtype)] * 3,
                          input_output_aliases=call.aliases)
    with pytest.raises(Exception, match="gradient element counts sum to 9, state has 10"):
        jax.block_until_ready(jax.jit(lambda: fn(p, p, p, jnp.float32(1), jnp.float32(1), jnp.zeros(9),
                                                 **call.attributes))())
    with pytest.raises(ValueError, match="gradients hold 9 elements"):
        kernels.adam_update(p, p, p, [jnp.zeros(9)], alpha=1.0, eps=1.0, beta_1=0.9, beta_2=0.999)


def test_call_layouts():
    call = kernels.adam_call(beta_1=0.9, beta_2=0.999, amsgrad=True, weight_decay=0.1, clip_scale=True)
    assert call.operands == ("p", "m", "v", "vhat", "alpha", "eps", "lr", "scale")
    assert call.aliases == {0: 0, 1: 1, 2: 2, 3: 3}
    assert call.attributes["one_minus_beta_1"] == np.float32(1 - 0.9) != np.float32(1) - np.float32(0.9)
    sgd = kernels.sgd_call(momentum=0.9)
    assert sgd.operands == ("p", "m", "lr") and sgd.aliases == {0: 0, 1: 1}
    pack = kernels.sgd_pack_call(3, momentum=0.9, clip_scale=True, scale_float32=True)
    assert pack.operands == ("m", "lr", "scale") and pack.results == ("m",)
    assert pack.aliases == {0: 0, 3: 1, 4: 2, 5: 3} and pack.attributes["scale_float32"]


# ---- the fallback paths: what a pass reports when it cannot use the kernels ----------------------------------


@pytest.fixture
def fresh_loader(monkeypatch):
    """Let a test point the loader elsewhere; the real library is looked up again afterwards."""
    _loader.reset()
    yield monkeypatch
    monkeypatch.undo()
    _loader.reset()


def test_missing_library_is_reported(fresh_loader, tmp_path):
    fresh_loader.setenv(_loader.ENV_LIBRARY, str(tmp_path / "libshardopt_kernels.so"))
    assert not kernels.available("adam", "float32")
    assert "not built" in kernels.reason("adam", "float32")
    assert kernels.info()["loaded"] is False


def test_unloadable_or_foreign_library_is_reported(fresh_loader, tmp_path):
    junk = tmp_path / "libshardopt_kernels.so"
    junk.write_bytes(b"not an ELF file")
    fresh_loader.setenv(_loader.ENV_LIBRARY, str(junk))
    assert "does not load" in kernels.reason("adam")
    _loader.reset()
    fresh_loader.setenv(_loader.ENV_LIBRARY, np._core._multiarray_umath.__file__)  # a shared library, not ours
    assert "not a shardopt kernel library" in kernels.reason("sgd")


def test_wrong_abi_is_reported(fresh_loader):
    fresh_loader.setattr(_loader, "ABI_VERSION", _loader.ABI_VERSION + 1)
    assert "reinstall shardopt" in kernels.reason("adam")


def test_disabled_and_unsupported_are_reported(fresh_loader):
    fresh_loader.setenv(_loader.ENV_DISABLE, "0")
    assert "disabled" in kernels.reason("adam")
    fresh_loader.delenv(_loader.ENV_DISABLE)
    _loader.reset()
    assert kernels.reason("adam", "float16") == (
        "compiled adam kernel supports float32 and bfloat16 variables, not float16")
    assert "platform 'gpu'" in kernels.reason("adam", "float32", "gpu")
    assert "no compiled kernel for 'lamb'" in kernels.reason("lamb")
    assert kernels.available("adam", np.float32) and kernels.available("adam", jnp.bfloat16)


# ---- the build: an install without a working compiler still succeeds ------------------------------------------


def _source_copy(tmp_path):
    root = Path(__file__).resolve().parents[1]
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(root / name, tmp_path / name)
    shutil.copytree(root / "shardopt" / "kernels" / "cpu", tmp_path / "shardopt" / "kernels" / "cpu")
    (tmp_path / "shardopt" / "__init__.py").write_text("")
    (tmp_path / "shardopt" / "kernels" / "__init__.py").write_text("")
    return tmp_path


@pytest.mark.parametrize("env", [{"CC": "/nonexistent/cc", "CXX": "/nonexistent/c++"},
                                 {"SHARDOPT_BUILD_KERNELS": "0"}], ids=["no-compiler", "opt-out"])
def test_build_without_compiler_warns_and_succeeds(tmp_path, env):
    src = _source_copy(tmp_path)
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "WARNING: shardopt's compiled update kernels were not built" in proc.stderr, proc.stderr[-2000:]
    assert not list((src / "shardopt" / "kernels").glob("libshardopt_kernels*"))


@pytest.mark.parametrize("options", [{}, {"amsgrad": True, "weight_decay": 0.01, "clip_scale": True}])
def test_pass_side_custom_call_has_jax_attributes(options):
    """`kernels.stablehlo.custom_call` builds the op `jax.ffi.ffi_call` lowers to (attribute for attribute)."""
    from jaxlib.mlir import ir

    from shardopt import ir as sir
    from shardopt.kernels.stablehlo import custom_call

    amsgrad, wd, clip = options.get("amsgrad", False), options.get("weight_decay"), options.get("clip_scale")
    x, g = jnp.zeros(96, jnp.float32), jnp.zeros((8, 8), jnp.float32)

    def f(p, m, v, vh, g, lr):
        return kernels.adam_update(p, m, v, [g, p[:32]], alpha=lr, eps=lr, beta_1=0.9, beta_2=0.999,
                                   vhat=vh if amsgrad else None, weight_decay=wd, lr=lr,
                                   clip_scale=lr if clip else None)

    text = jax.jit(f).lower(x, x, x, x, g, jnp.float32(1)).as_text()
    ctx = sir.make_ir_context()
    module = sir.parse(text, ctx)
    with ctx, ir.Location.unknown(ctx):
        theirs = next(op for op in sir.walk_ops(module.operation) if op.name == "stablehlo.custom_call")
        with ir.InsertionPoint(theirs):
            ours = custom_call(kernels.adam_call(beta_1=0.9, beta_2=0.999, amsgrad=amsgrad, weight_decay=wd,
                                                 clip_scale=bool(clip)), list(theirs.operands))
        def attrs(op):
            return {name: str(op.attributes[name]) for name in op.attributes}

        assert attrs(ours) == attrs(theirs)
        assert [str(r.type) for r in ours.results] == [str(r.type) for r in theirs.results]
        for a, b in zip(theirs.results, ours.results, strict=True):
            a.replace_all_uses_with(b)
        theirs.erase()
        assert module.operation.verify()
