"""`lower-to-kernels`: each update the frontend marks as a `stablehlo.composite "shardopt.<kind>"` (one variable) or
`"shardopt.<kind>_pack"` (a flat pack) becomes one `stablehlo.custom_call` to the compiled one-pass kernel
(shardopt/kernels) where that kernel exists for the definition, dtype and platform; every other composite is
inlined (its decomposition is today's jnp math), so the passes after it see plain StableHLO either way. Kinds:
Adam/AdamW ("adam") and tf-keras SGD ("sgd"); kernel_lowerings.py says what each lowers to.

Why: XLA:CPU compiles an Adam update into three loops per tensor (~40 bytes per element) and SGD with momentum
into two (24-28 bytes: m, then the variable re-reading the new m, and the gradient for Nesterov); the kernel
does one pass in place (its results alias the state: 28 bytes for Adam, 20 for SGD), 64M float32 elements in
~52 ms instead of ~126 ms for Adam, 0.54-0.75x the StableHLO step for SGD (benchmarks/bench_sgd.py).

What the frontend marks (frontend/step.py `_kernel_composite`, frontend/pack_kernel.py): variables kept in
buffers of their own, with a dense gradient, under a definition whose `kernel_spec()` is not None; operands
(var, grad, lr, t, *slots), attributes the definition's hyperparameters, weight decay and the slot names; and
packs whose members all have dense gradients (lr, t, iterations, packed slots, variables, gradients). A
composite is lowered when

- the library is loaded and has the kernel for the variable's dtype on `platform` (`shardopt.kernels.reason`);
- the variable and its slots are `@main` arguments (donated by the step contract), so they update in place;
- on a multi-device mesh, the state's shardings are closed and divide evenly: the call then runs per device on
  its shards in an `sdy.manual_computation` over every axis (passes/kernel_regions.py), so nothing is gathered.
  Variables whose state is sharded beyond their layout (`shard_state_over`) are not marked.

The kernel's runtime scalars are computed beside it as the definition does (Adam's alpha and eps, op for op). A
global-norm clip scale (`g * broadcast(scale)`) is folded into the call's `scale` operand, so the scaled gradient
is never written (applied as XLA:CPU compiles the step: Adam contracts it, fma(g, scale, -m); SGD keeps the
float32 product); a float32 gradient converted from a bfloat16 argument is passed as that argument (the convert
is exact). Results are bitwise those of the inlined decomposition (tests/test_pass_lower_to_kernels.py,
tests/test_sgd_kernel.py).

Global norms (`norms`): the sums of squares of a replicated pack's gradients and of large replicated gradients
in buffers of their own are spelled in one fixed order (fixed_order_norm.py) on both paths: one in-place
`shardopt_sumsq` call reading the gradient buffers where the kernel exists, the same order in StableHLO where it
does not, so a clipped kernel step and its portable twin compute the same scale (tests/test_fixed_order_norm.py).
Sharded gradients keep fixed-order-sums' per-device partial sums.
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
from shardopt.passes import kernel_regions as regions
from shardopt.passes.base import ModulePass, option
from shardopt.passes.fixed_order_norm import fixed_order_sumsq, kernel_sumsq
from shardopt.passes.inline_calls import COMPOSITE_PREFIX, inline_composite
from shardopt.passes.kernel_lowerings import LOWERINGS
from shardopt.passes.kernel_operands import (
    common_scale,
    composite_attributes,
    element_name,
    pass_gradient_buffers_through,
    replicated,
    split_scale,
    state_problem,
    unconverted,
)
from shardopt.passes.norm_trees import (
    f32_zero,
    global_norm_members,
    loose_gradient_sums,
    mark_fixed_order_pack,
    replace_member_sums,
)

PREFIX = COMPOSITE_PREFIX
# MLIR element types -> numpy names (kernels.reason reads "f16" as numpy's float128 otherwise)
DTYPE_NAMES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64"}
_warned: set[str] = set()


def _warn_once(why: str) -> None:
    """One warning per process and reason: the kernels are missing, the StableHLO path is kept."""
    if why in _warned:
        return
    _warned.add(why)
    warnings.warn(f"lower-to-kernels: compiled update kernels not used ({why}); keeping the StableHLO update",
                  RuntimeWarning, stacklevel=2)


@dataclass(frozen=True)
class LowerToKernels(ModulePass):
    """Replaces marked updates (Adam, SGD) by the compiled kernel's custom call; inlines the rest."""

    NAME: ClassVar[str] = "lower-to-kernels"
    platform: str = option("auto", "platform the module is compiled for; auto: jax's default backend "
                                   "(kernels exist for cpu only)")
    enabled: bool = option(True, "lower where possible; false inlines every composite (the StableHLO path)")
    fold_scale: bool = option(True, "pass a global-norm clip scale to the kernel instead of the scaled gradient")
    pack_scale_contracted: bool = option(True, "a folded clip scale in a pack kernel as XLA:CPU compiles the "
                                               "fused pack (Adam: fma(g, scale, -m)); false: g*scale rounded "
                                               "to the gradient dtype first")
    norms: bool = option(True, "sums of squares in the fixed order of fixed_order_norm.py: a lowered pack's global "
                               "norm and large loose gradients' as shardopt_sumsq calls (StableHLO when disabled)")
    norm_above: int = option(1 << 15, "sums of squares of replicated gradients in buffers of their own with more "
                                      "elements than this in the fixed order (kernel or StableHLO); smaller ones "
                                      "stay for fuse-clipping to batch")
    assume_available: bool = option(False, "emit the custom call even where this process has no kernel library "
                                           "(FileCheck, compiling for another machine)")

    def run(self, module: ir.Module) -> dict[str, Any]:
        funcs = {ir.StringAttr(op.attributes["sym_name"]).value: op.operation
                 for op in module.body.operations if op.operation.name == "func.func"}
        main = sir.main_func(module)
        block = main.regions[0].blocks[0]
        axes = sir.mesh_axes(module)
        stats: dict[str, Any] = {"composites": 0, "lowered": 0, "kernels": {}, "left": {}, "scales_folded": 0,
                                 "bf16_gradients": 0, "per_device": 0}
        # @main only: after inline-calls the traced per-shape functions are dead copies that cleanup removes.
        composites = [op for op in sir.walk_ops(main.operation) if op.name == "stablehlo.composite"
                      and ir.StringAttr(op.attributes["name"]).value.startswith(PREFIX)]
        operands = [v for op in composites for v in op.operands]
        for op in composites:
            stats["composites"] += 1
            why = self._lower(op, main, block, axes, stats)
            if why is not None:
                stats["left"][why] = stats["left"].get(why, 0) + 1
                inline_composite(op, funcs)
        lowered_packs = stats.pop("lowered_packs", set())
        if lowered_packs:
            stats["gradient_buffers_freed"] = pass_gradient_buffers_through(main, block, lowered_packs)
        stats.update(regions.unmarked_state_sharded(main, block, operands))
        if self.norms:
            self._loose_norms(module, stats)
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
        kind = ir.StringAttr(op.attributes["name"]).value[len(PREFIX):]
        a = composite_attributes(op)
        if kind.endswith(PACK_SUFFIX):
            return self._lower_pack(op, kind, a, main, block, axes, stats)
        if not self.enabled:
            return "disabled (enabled=false)"
        var, grad, lr, t, *slots = list(op.operands)
        dtype = DTYPE_NAMES.get(element_name(var), element_name(var))
        why = self._unavailable(kind, dtype)
        if why is not None:
            return why
        lowering = LOWERINGS.get(kind)
        if lowering is None:
            return f"no lowering of shardopt.{kind} composites"
        names = a["slots"].split(",") if a.get("slots") else []
        if names != lowering.slots(a) or len(slots) != len(names):
            return f"unexpected slots {names} for shardopt.{kind} (the kernel takes {lowering.slots(a)})"
        why = state_problem([var, *slots], main, block, axes)
        if why is not None:
            return why
        if any(x.type != var.type for x in slots) or ir.RankedTensorType(grad.type).shape != \
                ir.RankedTensorType(var.type).shape:
            return "slots or gradient of another shape than the variable"
        g, scale = split_scale(grad) if self.fold_scale else (grad, None)
        g = unconverted(g)  # the kernel converts a bfloat16 gradient exactly (and scales it in float32)
        call = lowering.call(a, None, scale is not None, True)
        shardings = regions.call_shardings(call, dict.fromkeys(("p", *names), var), [var], main, block, axes)
        if isinstance(shardings, str):
            return shardings
        with ir.InsertionPoint(op), op.location:
            named = {"p": var, **dict(zip(names, slots, strict=True)), "lr": lr, "scale": scale,
                     **lowering.scalars(a, lr, t)}
            kop = regions.emit(call, [named[n] for n in call.operands] + [g], shardings, axes)
        _replace(op, kop)
        _count(stats, call, scale, [g])
        stats["per_device"] += shardings is not None
        return None

    def _lower_pack(self, op: ir.Operation, kind: str, a: dict[str, Any], main: Any, block: ir.Block,
                    axes: dict[str, int], stats: dict[str, Any]) -> str | None:
        """A pack's composite (frontend/pack_kernel.py: lr, t, iterations, packed slots, variables, gradients)
        as one multi-tensor custom call, or why it stays StableHLO."""
        names = a["slots"].split(",") if a.get("slots") else []
        k = int(a["members"])
        lr, t, _iterations, *rest = list(op.operands)
        slots, ps, grads = rest[:len(names)], rest[len(names):len(names) + k], rest[len(names) + k:]
        dtype = DTYPE_NAMES.get(element_name(slots[0]), element_name(slots[0]))
        lowering = LOWERINGS.get(kind[:-len(PACK_SUFFIX)])
        if lowering is None or dtype not in kernels.DTYPES:
            return self._unavailable(kind, dtype) or f"no lowering of shardopt.{kind} composites"
        if names != lowering.slots(a) or len(grads) != k:
            return f"unexpected slots {names} for shardopt.{kind} (the kernel takes {lowering.slots(a)})"
        why = state_problem([*slots, *ps], main, block, axes)
        if why is not None:
            return why
        if any(element_name(p) != element_name(slots[0]) for p in ps):
            return "variables of another dtype than their packed slots"
        g, scale = common_scale(grads) if self.fold_scale else (grads, None)
        # A replicated pack this pass lowers where it can: its global norm is summed in the fixed order on either
        # path (a sharded one keeps fixed-order-sums' per-device partial sums on both)
        fixed_norm = scale is not None and self.norms and replicated(ps, main, block, axes)
        why = "disabled (enabled=false)" if not self.enabled else self._unavailable(kind, dtype)
        if why is not None:
            if fixed_norm:
                mark_fixed_order_pack(block, g)  # fuse-clipping writes the order over the packed gradient
            return why
        unscaled = g
        as_stored = [unconverted(x) for x in g]
        if len({element_name(x) for x in as_stored}) == 1:
            g = as_stored  # the kernel converts bfloat16 gradients exactly (and scales them in float32)
        call = lowering.call(a, k, scale is not None, self.pack_scale_contracted)
        shardings = regions.call_shardings(call, dict(zip(names, slots, strict=True)), [*ps, *ps], main, block, axes,
                                           pack=True)
        if isinstance(shardings, str):
            return shardings
        if fixed_norm:
            self._lower_pack_norm(block, unscaled, g, stats)
        with ir.InsertionPoint(op), op.location:
            named = {**dict(zip(names, slots, strict=True)), "lr": lr, "scale": scale, **lowering.scalars(a, lr, t)}
            kop = regions.emit(call, [named[n] for n in call.operands] + list(ps) + list(g), shardings, axes)
        _replace(op, kop)
        _count(stats, call, scale, g)
        stats["per_device"] += shardings is not None
        stats["packs_lowered"] = stats.get("packs_lowered", 0) + 1
        stats["pack_members"] = stats.get("pack_members", 0) + k
        stats.setdefault("lowered_packs", set()).add(str(a["pack"]))  # their gradient buffers: in run(), all at once
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

    def _loose_norms(self, module: ir.Module, stats: dict[str, Any]) -> None:
        """Every sum of squares of a large replicated gradient kept in its own buffer, in the fixed order of
        fixed_order_norm.py: one `shardopt_sumsq` call each where the kernel exists and this pass is enabled, else
        the same order in StableHLO. Decided alike on both paths (whatever happens to the update), so a clipped
        kernel step and its portable twin compute the same norm; on the kernel path the norm then reads each
        gradient once on XLA's thread pool (XLA's reduce of a large tensor ran at a third of the update kernel's
        bandwidth on GPT-2 small)."""
        leaves = loose_gradient_sums(module, self.norm_above)
        if not leaves:
            return
        kernel = self.enabled and self._unavailable("sumsq", "float32") is None
        f32 = ir.F32Type.get()
        for m, _ in leaves:
            with ir.InsertionPoint(m.reduce), m.reduce.location:
                flat = ir.RankedTensorType.get([int(np.prod(ir.RankedTensorType(m.x.type).shape))], f32)
                # the gradient as stored when the kernel reads it (float32, bfloat16), else its float32 convert
                total = kernel_sumsq([unconverted(m.x)]) if kernel else fixed_order_sumsq(hlo.reshape(flat, m.x))
            replace_member_sums([m], total, total)
        stats["norms_fixed_order"] = stats.get("norms_fixed_order", 0) + len(leaves)
        if kernel:
            stats["norms_lowered"] = stats.get("norms_lowered", 0) + len(leaves)
            stats["kernels"][SUMSQ_TARGET] = stats["kernels"].get(SUMSQ_TARGET, 0) + len(leaves)


def _replace(op: ir.Operation, kop: ir.Operation) -> None:
    for old, new in zip(op.results, kop.results, strict=True):
        old.replace_all_uses_with(new)
    op.erase()


def _count(stats: dict[str, Any], call: kernels.KernelCall, scale: ir.Value | None, grads: list[ir.Value]) -> None:
    stats["lowered"] += 1
    stats["kernels"][call.target] = stats["kernels"].get(call.target, 0) + 1
    stats["scales_folded"] += scale is not None
    stats["bf16_gradients"] += bool(grads) and element_name(grads[0]) == "bf16"
