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
tests/test_sgd_kernel.py; a pack with a global clip norm within a few ulp, tests/test_pack_kernel.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
from jaxlib.mlir import ir

from shardopt import ir as sir
from shardopt import kernels
from shardopt.kernels import PACK_SUFFIX
from shardopt.passes import kernel_regions as regions
from shardopt.passes.base import ModulePass, option
from shardopt.passes.inline_calls import COMPOSITE_PREFIX, inline_composite
from shardopt.passes.kernel_lowerings import LOWERINGS

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
    (donated by the step contract). (Shardings: `kernel_regions.call_shardings`.)"""
    if any(_block_arg_index(x, block) is None for x in state):
        return "state is not a @main argument"
    return None


def _common_scale(grads: list[ir.Value]) -> tuple[list[ir.Value], ir.Value | None]:
    """Gradients all scaled by one global-norm clip scale -> (unscaled gradients, the scale); else unchanged."""
    split = [_split_scale(g) for g in grads]
    scales = {s for _, s in split}
    if len(scales) == 1 and None not in scales:
        return [x for x, _ in split], split[0][1]
    return grads, None


def _pass_gradient_buffers_through(main: Any, block: ir.Block, packs: set[str]) -> int:
    """Each of `packs`' donated gradient scratch buffers returned as it came in: with the kernel reading the
    gradients in place, nothing needs the gathered gradient any more (`cleanup` removes the concatenation).
    Returns how many were. One walk over the attributes for all packs (per pack it was quadratic)."""
    def buffers(all_attrs: list[dict[str, ir.Attribute]]) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        for i, attrs in enumerate(all_attrs):
            if sir.string_attr(attrs.get("shardopt.role")) == "gradient_buffer":
                found.setdefault(sir.string_attr(attrs.get("shardopt.pack")), []).append(i)
        return found
    args, results = buffers(sir.arg_attrs(main)), buffers(sir.result_attrs(main))
    ret = block.operations[len(block.operations) - 1]
    freed = 0
    for pack in packs:
        if len(args.get(pack, ())) == 1 and len(results.get(pack, ())) == 1:
            ret.operands[results[pack][0]] = block.arguments[args[pack][0]]
            freed += 1
    return freed


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
            stats["gradient_buffers_freed"] = _pass_gradient_buffers_through(main, block, lowered_packs)
        stats.update(regions.unmarked_state_sharded(main, block, operands))
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
        lowering = LOWERINGS.get(kind)
        if lowering is None:
            return f"no lowering of shardopt.{kind} composites"
        names = a["slots"].split(",") if a.get("slots") else []
        if names != lowering.slots(a) or len(slots) != len(names):
            return f"unexpected slots {names} for shardopt.{kind} (the kernel takes {lowering.slots(a)})"
        why = _state_problem([var, *slots], main, block, axes)
        if why is not None:
            return why
        if any(x.type != var.type for x in slots) or ir.RankedTensorType(grad.type).shape != \
                ir.RankedTensorType(var.type).shape:
            return "slots or gradient of another shape than the variable"
        g, scale = _split_scale(grad) if self.fold_scale else (grad, None)
        g = _unconverted(g)  # the kernel converts a bfloat16 gradient exactly (and scales it in float32)
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
        dtype = {"f32": "float32", "bf16": "bfloat16"}.get(_element_type(slots[0]), _element_type(slots[0]))
        why = self._unavailable(kind, dtype)
        if why is not None:
            return why
        lowering = LOWERINGS.get(kind[:-len(PACK_SUFFIX)])
        if lowering is None:
            return f"no lowering of shardopt.{kind} composites"
        if names != lowering.slots(a) or len(grads) != k:
            return f"unexpected slots {names} for shardopt.{kind} (the kernel takes {lowering.slots(a)})"
        why = _state_problem([*slots, *ps], main, block, axes)
        if why is not None:
            return why
        if any(_element_type(p) != _element_type(slots[0]) for p in ps):
            return "variables of another dtype than their packed slots"
        g, scale = _common_scale(grads) if self.fold_scale else (grads, None)
        unconverted = [_unconverted(x) for x in g]
        if len({_element_type(x) for x in unconverted}) == 1:
            g = unconverted  # the kernel converts bfloat16 gradients exactly (and scales them in float32)
        call = lowering.call(a, k, scale is not None, self.pack_scale_contracted)
        shardings = regions.call_shardings(call, dict(zip(names, slots, strict=True)), [*ps, *ps], main, block, axes,
                                           pack=True)
        if isinstance(shardings, str):
            return shardings
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


def _replace(op: ir.Operation, kop: ir.Operation) -> None:
    for old, new in zip(op.results, kop.results, strict=True):
        old.replace_all_uses_with(new)
    op.erase()


def _count(stats: dict[str, Any], call: kernels.KernelCall, scale: ir.Value | None, grads: list[ir.Value]) -> None:
    stats["lowered"] += 1
    stats["kernels"][call.target] = stats["kernels"].get(call.target, 0) + 1
    stats["scales_folded"] += scale is not None
    stats["bf16_gradients"] += bool(grads) and _element_type(grads[0]) == "bf16"
