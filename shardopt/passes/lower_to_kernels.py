"""`lower-to-kernels`: each variable's update, marked by the frontend as a `stablehlo.composite "shardopt.adam"`,
becomes one `stablehlo.custom_call` to the compiled one-pass kernel (shardopt/kernels) where that kernel exists for
the definition, dtype and platform; every other composite is inlined (its decomposition is today's jnp math), so
the passes after it see plain StableHLO either way.

Why: XLA:CPU compiles an Adam update into three loops per tensor (~40 bytes per element); the kernel does one
pass in place (its results alias p, m, v and vhat), 64M float32 elements in ~52 ms instead of ~126 ms.

What the frontend marks (frontend/step.py `_kernel_composite`): variables kept in buffers of their own, with a
dense gradient, under a definition whose `kernel_spec()` is not None; operands (var, grad, lr, t, *slots),
attributes the betas, epsilon, amsgrad, weight decay and the slot names. Members of packs are never marked
(fuse-moments fuses them). A composite is lowered when

- the library is loaded and has the kernel for the variable's dtype on `platform` (`shardopt.kernels.reason`);
- the variable and its slots are `@main` arguments (donated by the step contract), so they update in place;
- the variable is not sharded over a mesh axis of size > 1 (the kernel runs on whole tensors; XLA would gather).

The kernel's scalars are computed here as Adam does (optimizers/adam.py `_alpha_eps`): alpha = lr * sqrt(1 -
b2^t) / (1 - b1^t) with float32(beta) constants, eps = float32(epsilon). A global-norm clip scale
(`g * broadcast(scale)`) is folded into the call's `scale` operand, so the scaled gradient is never written
(`scale_contracted`: the kernel contracts it as XLA:CPU does, fma(g, scale, -m)); a float32 gradient converted
from a bfloat16 argument is passed as that argument (the convert is exact).
Results are bitwise those of the inlined decomposition (tests/test_pass_lower_to_kernels.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import numpy as np
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import stablehlo as hlo

from shardopt import ir as sir
from shardopt import kernels
from shardopt.kernels import PACK_SUFFIX
from shardopt.kernels.calls import SUMSQ_TARGET
from shardopt.kernels.stablehlo import custom_call
from shardopt.passes.base import ModulePass, option
from shardopt.passes.fixed_order_norm import kernel_sumsq
from shardopt.passes.inline_calls import COMPOSITE_PREFIX, inline_composite
from shardopt.passes.norm_trees import f32_zero, global_norm_members, replace_member_sums

PREFIX = COMPOSITE_PREFIX
_warned: set[str] = set()


def _warn_once(why: str) -> None:
    """One warning per process and reason: the kernels are missing, the StableHLO path is kept."""
    if why in _warned:
        return
    _warned.add(why)
    warnings.warn(f"lower-to-kernels: compiled update kernels not used ({why}); keeping the StableHLO update",
                  RuntimeWarning, stacklevel=2)


def _attrs(op: ir.Operation) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for named in ir.DictAttr(op.attributes["composite_attributes"]):
        a = named.attr
        if isinstance(a, ir.BoolAttr):
            out[named.name] = bool(a.value)
        elif isinstance(a, ir.FloatAttr):
            out[named.name] = float(a.value)
        elif isinstance(a, ir.IntegerAttr):
            out[named.name] = int(a.value)
        elif isinstance(a, ir.StringAttr):
            out[named.name] = a.value
        else:
            out[named.name] = a
    return out


def _defining(value: ir.Value) -> ir.Operation | None:
    owner = value.owner
    if isinstance(owner, ir.Block):
        return None
    return owner.operation if isinstance(owner, ir.OpView) else owner


def _block_arg_index(value: ir.Value, main_block: ir.Block) -> int | None:
    if isinstance(value.owner, ir.Block) and value.owner == main_block:
        return ir.BlockArgument(value).arg_number
    return None


def _element_type(value: ir.Value) -> str:
    return str(ir.RankedTensorType(value.type).element_type)


def _split_scale(g: ir.Value) -> tuple[ir.Value, ir.Value | None]:
    """`x * broadcast_in_dim(s)` with a rank-0 float32 `s` (clipping.py's global-norm scale) -> (x, s)."""
    op = _defining(g)
    if op is None or op.name != "stablehlo.multiply":
        return g, None
    for x, b in ((op.operands[0], op.operands[1]), (op.operands[1], op.operands[0])):
        bop = _defining(b)
        if bop is not None and bop.name == "stablehlo.broadcast_in_dim":
            s = bop.operands[0]
            st = ir.RankedTensorType(s.type)
            if st.rank == 0 and str(st.element_type) == "f32" and x.type == g.type:
                return x, s
    return g, None


def _unconverted(g: ir.Value) -> ir.Value:
    """A float32 gradient that is `convert` of a bfloat16 value: that value (exact, and half the bytes)."""
    op = _defining(g)
    if op is not None and op.name == "stablehlo.convert" and _element_type(op.operands[0]) == "bf16":
        return op.operands[0]
    return g


def _state_problem(state: list[ir.Value], main: Any, block: ir.Block, axes: dict[str, int]) -> str | None:
    """Why these state values cannot be updated in place by a kernel, or None: each must be a `@main` argument
    (donated by the step contract) not sharded over a mesh axis of size > 1."""
    positions = [_block_arg_index(x, block) for x in state]
    if any(p is None for p in positions):
        return "state is not a @main argument"
    attrs = sir.arg_attrs(main)  # once: reading one argument's attributes decodes them all
    for p in positions:
        sharding = attrs[p].get("sdy.sharding")
        if sharding is not None and any(axes.get(ax, 1) > 1 for dim, _ in sir.sharding_dims(sharding) for ax in dim):
            return "variable sharded over the mesh (the kernel updates whole tensors)"
    return None


def _common_scale(grads: list[ir.Value]) -> tuple[list[ir.Value], ir.Value | None]:
    """Gradients all scaled by one global-norm clip scale -> (unscaled gradients, the scale); else unchanged."""
    split = [_split_scale(g) for g in grads]
    scales = {s for _, s in split}
    if len(scales) == 1 and None not in scales:
        return [x for x, _ in split], split[0][1]
    return grads, None


def _pass_gradient_buffer_through(main: Any, block: ir.Block, pack: str) -> bool:
    """The pack's donated gradient scratch buffer returned as it came in: with the kernel reading the gradients
    in place, nothing needs the gathered gradient any more (`cleanup` removes the concatenation)."""
    def is_buffer(attrs: dict[str, ir.Attribute]) -> bool:
        return sir.string_attr(attrs.get("shardopt.role")) == "gradient_buffer" and \
            sir.string_attr(attrs.get("shardopt.pack")) == pack
    args = [i for i, attrs in enumerate(sir.arg_attrs(main)) if is_buffer(attrs)]
    results = [i for i, attrs in enumerate(sir.result_attrs(main)) if is_buffer(attrs)]
    if len(args) != 1 or len(results) != 1:
        return False
    ret = block.operations[len(block.operations) - 1]
    ret.operands[results[0]] = block.arguments[args[0]]
    return True


def _f32_scalar(x: float) -> ir.Value:
    t = ir.RankedTensorType.get([], ir.F32Type.get())
    return hlo.ConstantOp(ir.DenseElementsAttr.get(np.asarray(np.float32(x)).reshape(()), type=t)).result


def _alpha_eps(a: dict[str, Any], lr: ir.Value, t: ir.Value) -> tuple[ir.Value, ir.Value]:
    """optimizers/adam.py `_alpha_eps` as scalar StableHLO, op for op (float32 betas, as `_via_float32`)."""
    one = _f32_scalar(1.0)
    b1_power = hlo.PowOp(_f32_scalar(a["beta_1"]), t).result
    b2_power = hlo.PowOp(_f32_scalar(a["beta_2"]), t).result
    num = hlo.MulOp(lr, hlo.SqrtOp(hlo.SubtractOp(one, b2_power).result).result).result
    alpha = hlo.DivOp(num, hlo.SubtractOp(one, b1_power).result).result
    return alpha, _f32_scalar(a["epsilon"])


@dataclass(frozen=True)
class LowerToKernels(ModulePass):
    """Replaces marked Adam updates by the compiled kernel's custom call; inlines the rest."""

    NAME: ClassVar[str] = "lower-to-kernels"
    platform: str = option("auto", "platform the module is compiled for; auto: jax's default backend "
                                   "(kernels exist for cpu only)")
    enabled: bool = option(True, "lower where possible; false inlines every composite (the StableHLO path)")
    fold_scale: bool = option(True, "pass a global-norm clip scale to the kernel instead of the scaled gradient")
    pack_scale_contracted: bool = option(True, "a folded clip scale in a pack kernel as XLA:CPU compiles the "
                                               "fused pack (fma(g, scale, -m)); false: g*scale rounded first")
    norms: bool = option(True, "a global norm over a pack's members as one shardopt_sumsq call reading the "
                               "gradients in place, in the fixed order fuse-clipping writes for the packed gradient")
    assume_available: bool = option(False, "emit the custom call even where this process has no kernel library "
                                           "(FileCheck, compiling for another machine)")

    def run(self, module: ir.Module) -> dict[str, Any]:
        funcs = {ir.StringAttr(op.attributes["sym_name"]).value: op.operation
                 for op in module.body.operations if op.operation.name == "func.func"}
        main = sir.main_func(module)
        block = main.regions[0].blocks[0]
        axes = sir.mesh_axes(module)
        stats: dict[str, Any] = {"composites": 0, "lowered": 0, "kernels": {}, "left": {}, "scales_folded": 0,
                                 "bf16_gradients": 0}
        # @main only: after inline-calls the traced per-shape functions are dead copies that cleanup removes.
        composites = [op for op in sir.walk_ops(main.operation) if op.name == "stablehlo.composite"
                      and ir.StringAttr(op.attributes["name"]).value.startswith(PREFIX)]
        for op in composites:
            stats["composites"] += 1
            why = self._lower(op, main, block, axes, stats)
            if why is not None:
                stats["left"][why] = stats["left"].get(why, 0) + 1
                inline_composite(op, funcs)
        if stats["lowered"] and not self.assume_available:
            stats["library"] = kernels.info()["isa"]
        return stats

    def _unavailable(self, kind: str, dtype: str) -> str | None:
        """Why the `kind` kernel cannot be called for `dtype` state on this pass's platform, or None."""
        platform = jax.default_backend() if self.platform == "auto" else self.platform
        why = kernels.reason(kind, dtype, platform)
        if why is not None and self.assume_available and kind in kernels.KERNELS and dtype in kernels.DTYPES:
            why = None
        if why is not None and kind in kernels.KERNELS and dtype in kernels.DTYPES and platform in kernels.PLATFORMS:
            _warn_once(why)  # the library itself is missing: say so once
        return why

    def _lower(self, op: ir.Operation, main: Any, block: ir.Block, axes: dict[str, int],
               stats: dict[str, Any]) -> str | None:
        """Emits the custom call for `op` and returns None, or returns why it stays StableHLO."""
        if not self.enabled:
            return "disabled (enabled=false)"
        kind = ir.StringAttr(op.attributes["name"]).value[len(PREFIX):]
        a = _attrs(op)
        if kind.endswith(PACK_SUFFIX):
            return self._lower_pack(op, kind, a, main, block, axes, stats)
        var, grad, lr, t, *slots = list(op.operands)
        dtype = {"f32": "float32", "bf16": "bfloat16"}.get(_element_type(var), _element_type(var))
        why = self._unavailable(kind, dtype)
        if why is not None:
            return why
        if kind != "adam":
            return f"no lowering of shardopt.{kind} composites"
        names = a["slots"].split(",") if a.get("slots") else []
        expected = ["m", "v", "vhat"] if a["amsgrad"] else ["m", "v"]
        if names != expected or len(slots) != len(names):
            return f"unexpected slots {names} for amsgrad={a['amsgrad']}"
        why = _state_problem([var, *slots], main, block, axes)
        if why is not None:
            return why
        if any(x.type != var.type for x in slots) or ir.RankedTensorType(grad.type).shape != \
                ir.RankedTensorType(var.type).shape:
            return "slots or gradient of another shape than the variable"
        g, scale = _split_scale(grad) if self.fold_scale else (grad, None)
        g = _unconverted(g)  # the kernel converts a bfloat16 gradient exactly (and scales it in float32)
        call = kernels.adam_call(beta_1=a["beta_1"], beta_2=a["beta_2"], amsgrad=a["amsgrad"],
                                 weight_decay=a["weight_decay"] if a["has_weight_decay"] else None,
                                 clip_scale=scale is not None, scale_contracted=True)
        with ir.InsertionPoint(op), op.location:
            alpha, eps = _alpha_eps(a, lr, t)
            named = {"p": var, "m": slots[0], "v": slots[1], "alpha": alpha, "eps": eps, "lr": lr, "scale": scale}
            if a["amsgrad"]:
                named["vhat"] = slots[2]
            kop = custom_call(call, [named[n] for n in call.operands] + [g])
        for old, new in zip(op.results, kop.results, strict=True):
            old.replace_all_uses_with(new)
        op.erase()
        stats["lowered"] += 1
        stats["kernels"][call.target] = stats["kernels"].get(call.target, 0) + 1
        stats["scales_folded"] += scale is not None
        stats["bf16_gradients"] += _element_type(g) == "bf16"
        return None

    def _lower_pack_norm(self, block: ir.Block, xs: list[ir.Value], operands: list[ir.Value],
                         stats: dict[str, Any]) -> None:
        """The global norm's sums of squares of the pack's gradients `xs` as one `shardopt_sumsq` reading the
        gradient buffers `operands` in place, in the order fuse-clipping sums the packed gradient on the
        StableHLO path (fixed_order_norm.py): both paths compute the same scale, and no gradient is gathered."""
        members = global_norm_members(block, xs)
        why = "norm: not one global norm over the pack" if members is None else self._unavailable("sumsq", "float32")
        if why is not None:
            stats["left"][why] = stats["left"].get(why, 0) + 1
            return
        reduces = {m.reduce for m in members}
        first = next(op.operation for op in block.operations if op.operation in reduces)
        with ir.InsertionPoint(first), first.location:
            replace_member_sums(members, kernel_sumsq(operands), f32_zero())
        stats["norms_lowered"] = stats.get("norms_lowered", 0) + 1
        stats["kernels"][SUMSQ_TARGET] = stats["kernels"].get(SUMSQ_TARGET, 0) + 1

    def _lower_pack(self, op: ir.Operation, kind: str, a: dict[str, Any], main: Any, block: ir.Block,
                    axes: dict[str, int], stats: dict[str, Any]) -> str | None:
        """A pack's composite (frontend/pack_kernel.py: lr, t, iterations, packed slots, variables, gradients)
        as one multi-tensor custom call, or why it stays StableHLO."""
        names = a["slots"].split(",") if a.get("slots") else []
        k = int(a["members"])
        lr, t, _iterations, *rest = list(op.operands)
        slots, ps, grads = rest[:len(names)], rest[len(names):len(names) + k], rest[len(names) + k:]
        dtype = {"f32": "float32", "bf16": "bfloat16"}.get(_element_type(slots[0]), _element_type(slots[0]))
        why = self._unavailable(kind, dtype)
        if why is not None:
            return why
        if kind != "adam" + PACK_SUFFIX:
            return f"no lowering of shardopt.{kind} composites"
        expected = ["m", "v", "vhat"] if a["amsgrad"] else ["m", "v"]
        if names != expected or len(grads) != k:
            return f"unexpected slots {names} for amsgrad={a['amsgrad']}"
        why = _state_problem([*slots, *ps], main, block, axes)
        if why is not None:
            return why
        if any(_element_type(p) != _element_type(slots[0]) for p in ps):
            return "variables of another dtype than their packed slots"
        g, scale = _common_scale(grads) if self.fold_scale else (grads, None)
        unscaled = g
        unconverted = [_unconverted(x) for x in g]
        if len({_element_type(x) for x in unconverted}) == 1:
            g = unconverted  # the kernel converts bfloat16 gradients exactly (and scales them in float32)
        if scale is not None and self.norms:
            self._lower_pack_norm(block, unscaled, g, stats)
        call = kernels.adam_pack_call(k, beta_1=a["beta_1"], beta_2=a["beta_2"], amsgrad=a["amsgrad"],
                                      weight_decay=a["weight_decay"] if a["has_weight_decay"] else None,
                                      clip_scale=scale is not None, scale_contracted=self.pack_scale_contracted)
        with ir.InsertionPoint(op), op.location:
            alpha, eps = _alpha_eps(a, lr, t)
            named = {"m": slots[0], "v": slots[1], "alpha": alpha, "eps": eps, "lr": lr, "scale": scale}
            if a["amsgrad"]:
                named["vhat"] = slots[2]
            kop = custom_call(call, [named[n] for n in call.operands] + list(ps) + list(g))
        for old, new in zip(op.results, kop.results, strict=True):
            old.replace_all_uses_with(new)
        op.erase()
        stats["lowered"] += 1
        stats["packs_lowered"] = stats.get("packs_lowered", 0) + 1
        stats["pack_members"] = stats.get("pack_members", 0) + k
        stats["kernels"][call.target] = stats["kernels"].get(call.target, 0) + 1
        stats["scales_folded"] += scale is not None
        stats["bf16_gradients"] += _element_type(g[0]) == "bf16" if g else 0
        stats["gradient_buffers_freed"] = stats.get("gradient_buffers_freed", 0) + \
            _pass_gradient_buffer_through(main, block, str(a["pack"]))
        return None
