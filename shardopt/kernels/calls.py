"""Operand layouts of the kernels' custom calls, and jax functions calling them through `jax.ffi.ffi_call`.

Both kernels take the packed state first, then rank-0 float32 runtime scalars, then the K gradient buffers
whose flattened concatenation is the packed gradient; results alias the state operands:

    shardopt_adam_update(p, m, v, [vhat], alpha, eps, [lr], [scale], g_0 .. g_K-1) -> (p, m, v, [vhat])
    shardopt_sgd_update(p, m, lr, [scale], g_0 .. g_K-1) -> (p, m)

A pack whose variables stay in buffers of their own (only the slots packed, core/packing.py) has one variable
operand per gradient, before the gradients; its results are the packed slots, then the variables:

    shardopt_adam_pack_update(m, v, [vhat], alpha, eps, [lr], [scale], p_0 .. p_K-1, g_0 .. g_K-1)
        -> (m, v, [vhat], p_0 .. p_K-1)
    shardopt_sgd_pack_update(m, lr, [scale], p_0 .. p_K-1, g_0 .. g_K-1) -> (m, p_0 .. p_K-1)

The sum of squares of K gradient buffers (their flattened concatenation), a float32 scalar, in the fixed order
`sumsq_width` and passes/fixed_order_norm.py define (lanes over fixed-width rows, then halving):

    shardopt_sumsq(g_0 .. g_K-1) -> total

`lr` is present for Adam only with weight decay. Attributes hold what is constant for a module: float32(1 -
beta), as XLA folds `jnp.asarray(1 - beta, float32)`; float32(weight_decay); the flags. State is float32 or
bfloat16 (float32 math, one rounding when stored); gradients all float32 or all bfloat16.

Numerics match shardopt's StableHLO update (frontend/step.py `_update_entry`, frontend/adam.py) as XLA:CPU
compiles it: bitwise for float32 and bfloat16 (see tests/test_kernels.py). The clip scale is what multiplies
the gradient: `scale.astype(g.dtype)` in clipping.py, which XLA then multiplies in float32; `clip_scale_operand`
gives that value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ADAM_TARGET = "shardopt_adam_update"
ADAM_PACK_TARGET = "shardopt_adam_pack_update"
SGD_TARGET = "shardopt_sgd_update"
SGD_PACK_TARGET = "shardopt_sgd_pack_update"
SUMSQ_TARGET = "shardopt_sumsq"
# Lanes of the fixed summation order of `shardopt_sumsq` (kSumsqLanes in cpu/kernels.cc).
SUMSQ_LANES = 1 << 16


@dataclass(frozen=True)
class KernelCall:
    """One custom call: its FFI target, attributes, the operands before the gradients, results and aliases."""

    target: str
    attributes: dict[str, Any]
    operands: tuple[str, ...]  # named operands, in order; the gradients follow them
    results: tuple[str, ...]
    variables: int = 0  # a pack call: this many variable buffers after the named operands, results after them

    @property
    def aliases(self) -> dict[int, int]:
        """operand index -> result index (input_output_aliases / output_operand_aliases)."""
        named = {self.operands.index(r): i for i, r in enumerate(self.results)}
        first = len(self.operands)
        named.update({first + j: len(self.results) + j for j in range(self.variables)})
        return named


def adam_call(*, beta_1: float, beta_2: float, amsgrad: bool = False, weight_decay: float | None = None,
              clip_scale: bool = False, scale_contracted: bool = False) -> KernelCall:
    """The Adam/AdamW call for these options (the optimizer's python floats, rounded as shardopt rounds them).

    `scale_contracted`: the clip scale as XLA:CPU compiles it for a variable in buffers of its own (the product
    g*scale stays float32 and is contracted into m's subtraction, fma(g, scale, -m)); default: as for a packed
    gradient (g*scale rounded to the gradient dtype)."""
    operands = ("p", "m", "v") + (("vhat",) if amsgrad else ()) + ("alpha", "eps")
    operands += (("lr",) if weight_decay is not None else ()) + (("scale",) if clip_scale else ())
    attributes = {
        "one_minus_beta_1": np.float32(1 - beta_1),
        "one_minus_beta_2": np.float32(1 - beta_2),
        "amsgrad": bool(amsgrad),
        "has_weight_decay": weight_decay is not None,
        "weight_decay": np.float32(0.0 if weight_decay is None else weight_decay),
        "has_scale": bool(clip_scale),
        "scale_contracted": bool(clip_scale and scale_contracted),
    }
    results = ("p", "m", "v") + (("vhat",) if amsgrad else ())
    return KernelCall(ADAM_TARGET, attributes, operands, results)


def adam_pack_call(variables: int, **options: Any) -> KernelCall:
    """The Adam/AdamW call for a pack of `variables` variables in buffers of their own (options: `adam_call`'s)."""
    single = adam_call(**options)
    operands = tuple(o for o in single.operands if o != "p")
    return KernelCall(ADAM_PACK_TARGET, single.attributes, operands, tuple(r for r in single.results if r != "p"),
                      variables=variables)


def sgd_call(*, momentum: float, nesterov: bool = False, weight_decay: float | None = None,
             clip_scale: bool = False, scale_float32: bool = False) -> KernelCall:
    """The SGD-with-momentum call for these options.

    `scale_float32`: the clip scale as a step applies it (gradients converted to float32 before clipping, so the
    product g*scale stays float32; frontend/step.py); default: g*scale rounded to the gradient dtype, as
    clipping.py computes it on a gradient of that dtype."""
    operands = ("p", "m", "lr") + (("scale",) if clip_scale else ())
    attributes = {
        "momentum": np.float32(momentum),
        "nesterov": bool(nesterov),
        "has_weight_decay": weight_decay is not None,
        "weight_decay": np.float32(0.0 if weight_decay is None else weight_decay),
        "has_scale": bool(clip_scale),
        "scale_float32": bool(clip_scale and scale_float32),
    }
    return KernelCall(SGD_TARGET, attributes, operands, ("p", "m"))


def sgd_pack_call(variables: int, **options: Any) -> KernelCall:
    """The SGD call for a pack of `variables` variables in buffers of their own (options: `sgd_call`'s)."""
    single = sgd_call(**options)
    return KernelCall(SGD_PACK_TARGET, single.attributes, tuple(o for o in single.operands if o != "p"), ("m",),
                      variables=variables)
def sumsq_call() -> KernelCall:
    """The sum-of-squares call: gradients only, one float32 scalar result, no aliases."""
    return KernelCall(SUMSQ_TARGET, {}, (), ())


def sumsq_width(n: int) -> int:
    """Lanes of the fixed order for `n` elements: min(SUMSQ_LANES, the power of two >= n)."""
    w = 1
    while w < n and w < SUMSQ_LANES:
        w *= 2
    return w


def sumsq(xs: Sequence[jax.Array]) -> jax.Array:
    """The float32 sum of squares of the concatenation of `xs` (all float32 or all bfloat16) in the fixed order."""
    xs = list(xs)
    if len({x.dtype for x in xs}) > 1 or any(x.dtype not in (jnp.float32, jnp.bfloat16) for x in xs):
        raise ValueError("operands must all be float32 or all bfloat16")
    fn = jax.ffi.ffi_call(SUMSQ_TARGET, jax.ShapeDtypeStruct((), jnp.float32))
    return fn(*xs)


def clip_scale_operand(scale: Any, grad_dtype: Any) -> jax.Array:
    """The float32 operand for a clip scale: `scale.astype(grad_dtype)` (clipping.py) as float32."""
    return jnp.asarray(scale).astype(grad_dtype).astype(jnp.float32)


def _scalar(x: Any) -> jax.Array:
    return jnp.asarray(x, jnp.float32).reshape(())


def _check(state: Sequence[jax.Array], grads: Sequence[jax.Array]) -> None:
    p = state[0]
    for s in state[1:]:
        if s.shape != p.shape or s.dtype != p.dtype:
            raise ValueError(f"state buffers must share shape and dtype: {p.shape} {p.dtype} vs {s.shape} {s.dtype}")
    if p.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"kernel state must be float32 or bfloat16, not {p.dtype}")
    if len({g.dtype for g in grads}) > 1 or any(g.dtype not in (jnp.float32, jnp.bfloat16) for g in grads):
        raise ValueError("gradients must all be float32 or all bfloat16")
    total = sum(int(np.prod(g.shape)) for g in grads)
    if total != int(np.prod(p.shape)):
        raise ValueError(f"gradients hold {total} elements, the state {int(np.prod(p.shape))}")


def _check_pack(ps: Sequence[jax.Array], slot: jax.Array, grads: Sequence[jax.Array]) -> None:
    if len(ps) != len(grads) or any(p.size != g.size for p, g in zip(ps, grads, strict=True)):
        raise ValueError("one variable per gradient, of the gradient's size")
    if any(p.dtype != slot.dtype for p in ps):
        raise ValueError("variables must have the slots' dtype")


def _scale_dtype(grads: Sequence[jax.Array], scale_float32: bool = False) -> Any:
    """The dtype a clip scale is rounded to: the gradients' (clipping.py), or float32 in a step's form."""
    return jnp.float32 if scale_float32 or not grads else grads[0].dtype


def _invoke(call: KernelCall, named: dict[str, Any], grads: Sequence[jax.Array],
            variables: Sequence[jax.Array] = ()) -> tuple[jax.Array, ...]:
    operands = [named[name] for name in call.operands] + list(variables) + list(grads)
    result_types = [jax.ShapeDtypeStruct(named[r].shape, named[r].dtype) for r in call.results]
    result_types += [jax.ShapeDtypeStruct(p.shape, p.dtype) for p in variables]
    fn = jax.ffi.ffi_call(call.target, result_types, input_output_aliases=call.aliases)
    return tuple(fn(*operands, **call.attributes))


def adam_update(p: jax.Array, m: jax.Array, v: jax.Array, grads: Sequence[jax.Array], *, alpha: Any, eps: Any,
                beta_1: float, beta_2: float, vhat: jax.Array | None = None, weight_decay: float | None = None,
                lr: Any = None, clip_scale: Any = None) -> tuple[jax.Array, ...]:
    """One Adam step of a packed group: returns (p, m, v) or, with `vhat` (AMSGrad), (p, m, v, vhat).

    `alpha` = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t) and `eps` are runtime float32 scalars (frontend/adam.py
    `_alpha_eps`); `lr` is needed with `weight_decay` (p -= (p * wd) * lr first); `clip_scale` multiplies the
    gradients first. Donate p, m, v (and vhat) to update them in place.
    """
    grads = list(grads)
    state = [p, m, v] + ([vhat] if vhat is not None else [])
    _check(state, grads)
    if weight_decay is not None and lr is None:
        raise ValueError("weight_decay needs lr")
    call = adam_call(beta_1=beta_1, beta_2=beta_2, amsgrad=vhat is not None, weight_decay=weight_decay,
                     clip_scale=clip_scale is not None)
    named = {"p": p, "m": m, "v": v, "vhat": vhat, "alpha": _scalar(alpha), "eps": _scalar(eps)}
    if weight_decay is not None:
        named["lr"] = _scalar(lr)
    if clip_scale is not None:
        named["scale"] = clip_scale_operand(clip_scale, _scale_dtype(grads))
    return _invoke(call, named, grads)


def adam_pack_update(ps: Sequence[jax.Array], m: jax.Array, v: jax.Array, grads: Sequence[jax.Array], *,
                     alpha: Any, eps: Any, beta_1: float, beta_2: float, vhat: jax.Array | None = None,
                     weight_decay: float | None = None, lr: Any = None, clip_scale: Any = None
                     ) -> tuple[list[jax.Array], tuple[jax.Array, ...]]:
    """`adam_update` for variables in buffers of their own (`ps[j]` updated with `grads[j]`) and packed slots:
    returns (new ps, (m, v[, vhat])). Donate ps, m, v (and vhat) to update them in place."""
    ps, grads = list(ps), list(grads)
    _check_pack(ps, m, grads)
    _check([m, v] + ([vhat] if vhat is not None else []), grads)
    if weight_decay is not None and lr is None:
        raise ValueError("weight_decay needs lr")
    call = adam_pack_call(len(ps), beta_1=beta_1, beta_2=beta_2, amsgrad=vhat is not None,
                          weight_decay=weight_decay, clip_scale=clip_scale is not None)
    named = {"m": m, "v": v, "vhat": vhat, "alpha": _scalar(alpha), "eps": _scalar(eps)}
    if weight_decay is not None:
        named["lr"] = _scalar(lr)
    if clip_scale is not None:
        named["scale"] = clip_scale_operand(clip_scale, _scale_dtype(grads))
    out = _invoke(call, named, grads, ps)
    k = len(call.results)
    return list(out[k:]), out[:k]


def sgd_update(p: jax.Array, m: jax.Array, grads: Sequence[jax.Array], *, lr: Any, momentum: float,
               nesterov: bool = False, weight_decay: float | None = None, clip_scale: Any = None,
               scale_float32: bool = False) -> tuple[jax.Array, jax.Array]:
    """One tf-keras SGD-with-momentum step of a packed group: returns (p, m). `clip_scale` multiplies the
    gradients first (`scale_float32`: as a step does, see `sgd_call`). Donate p and m to update them in place."""
    grads = list(grads)
    _check([p, m], grads)
    call = sgd_call(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                    clip_scale=clip_scale is not None, scale_float32=scale_float32)
    named = {"p": p, "m": m, "lr": _scalar(lr)}
    if clip_scale is not None:
        named["scale"] = clip_scale_operand(clip_scale, _scale_dtype(grads, scale_float32))
    out = _invoke(call, named, grads)
    return out[0], out[1]


def sgd_pack_update(ps: Sequence[jax.Array], m: jax.Array, grads: Sequence[jax.Array], *, lr: Any,
                    momentum: float, nesterov: bool = False, weight_decay: float | None = None,
                    clip_scale: Any = None, scale_float32: bool = False) -> tuple[list[jax.Array], jax.Array]:
    """`sgd_update` for variables in buffers of their own (`ps[j]` updated with `grads[j]`) and a packed `m`:
    returns (new ps, m). Donate ps and m to update them in place."""
    ps, grads = list(ps), list(grads)
    _check_pack(ps, m, grads)
    _check([m], grads)
    call = sgd_pack_call(len(ps), momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                         clip_scale=clip_scale is not None, scale_float32=scale_float32)
    named = {"m": m, "lr": _scalar(lr)}
    if clip_scale is not None:
        named["scale"] = clip_scale_operand(clip_scale, _scale_dtype(grads, scale_float32))
    out = _invoke(call, named, grads, ps)
    return list(out[1:]), out[0]
