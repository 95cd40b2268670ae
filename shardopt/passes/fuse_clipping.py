"""`fuse-clipping`: batches the gradient-norm reductions of norm clipping into a few variadic reductions.

Both `clipnorm` (a norm per tensor) and `global_clipnorm` (one norm over all tensors) start with one
`reduce(add, all dims)(multiply(x, x))` per gradient (the dense gradient, or the rows of a sparse one). With many
tensors XLA:CPU compiles each into a multiply kernel that materialises `x * x`, a reduce-window kernel and a
reduce kernel (measured on 2000 x f32[3700], global norm: 7 kernels per tensor, 52 bytes per element, a 29.7 MB
temp buffer).

This pass replaces the sums of squares of gradients with the same type and layout by one variadic
`stablehlo.reduce` per group of at most `max_operands`: one kernel reads each gradient once, squares in
registers and writes one partial per tensor. Each partial replaces its tensor's reduction, so `clipnorm` keeps
its per-tensor norms (now batched) and sparse gradients keep their rows-only norm. For `global_clipnorm` the
scalar add tree that sums the per-tensor partials (tf's l2_loss halves) is then replaced by one reduction over
the stacked partials. The clip scale stays a scalar that the moment updates multiply in: XLA fuses it into the
m and v kernels and no clipped gradient (nor `x * x`) is materialised; the compiled-HLO test checks the temp
size. Measured on that step: 13998 -> 6129 loop kernels, 52.3 -> 44.0 bytes per element (Adam's 40 plus one
read of the gradient for the norm), no temp buffer, about 20% less step time.

With packed state, `fuse-moments` runs first and concatenates each pack's gradients for its fused chain; a
global norm then sums the squares of that packed gradient once (one contiguous read) instead of reading every
member's buffer again ("packed_gradient_norms" in the statistics). A flat pack's sum is written in the fixed
order of fixed_order_norm.py, the order of the `shardopt_sumsq` kernel that `lower-to-kernels` calls for a pack
it lowers, so the portable step and the kernel step compute the same clip scale; a flat pack whose gradients
fuse-moments did not concatenate (bfloat16 state) is summed in that order over their concatenation.

What is batched, and why the rest is not (counted in the statistics under `unbatched`):
- only tensors of at most `max_elements` elements per device: XLA:CPU emits a variadic reduce as one plain
  loop, which beats a kernel per small tensor but loses to its reduction emitters on large tensors;
- only layouts whose unsharded dimensions are the minor ones (replicated, or sharded on leading dims): the
  variadic reduce sums over the unsharded dimensions, which every device holds whole, and then each member
  gets a small second reduce over its sharded dimensions, which XLA partitions as a local reduce plus an
  all-reduce (combined with the others into one). A variadic reduce over sharded dimensions would be
  partitioned with all-gathers instead, and local sums over a major dimension read with a stride ("strided");
- never across layouts or types, and never for layouts without an unsharded dimension or unknown layouts;
- never a sum whose input is computed from another sum (Adafactor's rms of its update after global clipping).
So the collectives of a sharded step are those of the unfused step (tested on the 2x4 mesh).

Numerics: each tensor's sum is still one reduction over its elements; only the order in which XLA adds
elements (and, for the global norm, the order of the per-tensor partials) may change: results agree within a
few float32 ulps (the tests require 1e-6 relative).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import stablehlo as hlo

from shardopt import ir as sir
from shardopt.passes import fusion_ir as fir
from shardopt.passes.base import ModulePass, option
from shardopt.passes.norm_trees import (
    SumOfSquares,
    erase_tree,
    from_batched_norm,
    is_scalar_add,
    match_sum_of_squares,
    reduce_packed_gradients,
    single_add_user,
    sum_flat_pack_gradients,
    tree_leaves,
)


@dataclass(frozen=True)
class FuseClipping(ModulePass):
    """Batches sums of squares by (type, layout) into variadic reductions; collapses the global-norm add tree."""

    NAME: ClassVar[str] = "fuse-clipping"
    max_operands: int = option(16, "most gradients summed by one variadic reduce")
    # XLA:CPU emits a variadic reduce as one plain loop: it beats one kernel per small tensor, but the single
    # reductions of large tensors use XLA's faster reduction emitters (measured: 12 x f32[768,576] take 2.1 ms
    # batched, 0.8 ms apart; 16 x f32[3700] 0.08 ms batched, 0.17 ms apart; even at 16 x f32[65536]).
    max_elements: int = option(1 << 15, "largest tensor (elements per device) whose norm is batched")

    def __post_init__(self) -> None:
        self.check(self.max_operands >= 1, "max-operands", "at least 1")
        self.check(self.max_elements >= 0, "max-elements", "non-negative")

    def run(self, module: ir.Module) -> dict[str, Any]:
        block = fir.main_block(module)
        ops_before = sum(sir.op_counts(module).values())
        found = [m for op in block.operations if (m := match_sum_of_squares(op.operation)) is not None]
        found, packed = reduce_packed_gradients(block, found)
        found, flat_packs = sum_flat_pack_gradients(module, found)
        packed += flat_packs
        layouts = fir.Shardings(module)
        mesh = sir.mesh_axes(module)
        groups: dict[tuple[str, Any, int], list[SumOfSquares]] = {}
        unbatched: Counter[str] = Counter()
        depth = _norm_depths(block, found)
        for s in found:
            lay = layouts.of(s.x)
            reason = "unknown layout" if lay is None else self._unbatchable(fir.shape_of(s.square), lay, mesh)
            if reason:
                unbatched[reason] += 1
            else:
                groups.setdefault((str(s.square.type), lay, depth[s.square]), []).append(s)
        position = {op.operation: i for i, op in enumerate(block.operations)}
        sizes: Counter[int] = Counter()
        batched = 0
        for (_, layout, _), members in groups.items():
            for i in range(0, len(members), self.max_operands):
                chunk = members[i:i + self.max_operands]
                sizes[len(chunk)] += 1
                if len(chunk) > 1:
                    self._batch(chunk, layout, position)
                    batched += 1
        trees, leaves = self._collapse_add_trees(block)
        moved = fir.stable_topo_sort(block)
        return {
            "sums_of_squares": len(found),
            "groups": len(groups),
            "tensors_per_group": {str(k): v for k, v in sorted(sizes.items())},
            "batched_reductions": batched,
            "unbatched": dict(unbatched),
            "packed_gradient_norms": packed,
            "norm_trees_collapsed": trees,
            "norm_tree_leaves": leaves,
            "ops_moved": moved,
            "ops_before": ops_before,
            "ops_after": sum(sir.op_counts(module).values()),
        }

    def _unbatchable(self, shape: list[int], layout: tuple[Any, ...], mesh: dict[str, int]) -> str:
        """Why a sum of squares over a tensor laid out as `layout` stays a reduction of its own ("" if not)."""
        local = [d for d, entry in enumerate(layout) if entry is None]
        if not local:
            return "no unsharded dimension"  # nothing every device holds whole
        if local != list(range(len(shape) - len(local), len(shape))):
            return "strided"  # the local sums would run across a major dimension, with strided reads
        shards = 1
        for entry in layout:
            for axis in (entry,) if isinstance(entry, str) else tuple(entry or ()):
                shards *= mesh.get(axis, 1)
        if int(np.prod(shape)) // shards > self.max_elements:
            return "large"
        return ""

    @staticmethod
    def _batch(chunk: list[SumOfSquares], layout: tuple[Any, ...], position: dict[ir.Operation, int]) -> None:
        """One variadic reduce for `chunk`, placed after the last of its inputs; each result replaces a reduce.

        The variadic reduce only sums over the unsharded dimensions, which every device holds whole: XLA
        partitions a variadic reduce over sharded dimensions with all-gathers, while a single-operand reduce
        becomes a local reduce plus an all-reduce (and XLA combines those into one). So with sharded dimensions
        each member gets a second, single-operand reduce over its sharded dimensions (small: one value per
        element of the sharded dimensions).
        """
        last = max((fir.op_of(s.square) for s in chunk), key=lambda op: position[op])
        elt = fir.element_type(chunk[0].square)
        shape = fir.shape_of(chunk[0].square)
        local = [d for d, entry in enumerate(layout) if entry is None]
        kept = [n for d, n in enumerate(shape) if d not in local]
        with ir.InsertionPoint.after(last), last.location:
            zero = hlo.ConstantOp(ir.DenseElementsAttr.get_splat(fir.scalar_type(elt), ir.FloatAttr.get(elt, 0.0)))
            partial_type = ir.RankedTensorType.get(kept, elt)
            red = hlo.ReduceOp([partial_type] * len(chunk), [s.square for s in chunk], [zero.result] * len(chunk),
                               local)
            fir.add_body(red.operation, elt, len(chunk))
            sums = list(red.results)
            if kept:
                sums = []
                for partial in red.results:
                    rest = hlo.ReduceOp([fir.scalar_type(elt)], [partial], [zero.result], list(range(len(kept))))
                    fir.add_body(rest.operation, elt, 1)
                    sums.append(rest.results[0])
        for s, total in zip(chunk, sums, strict=True):
            s.reduce.results[0].replace_all_uses_with(total)
            s.reduce.erase()

    @staticmethod
    def _collapse_add_trees(block: ir.Block) -> tuple[int, int]:
        """Replaces each scalar float add tree (>= 3 leaves) that sums batched norm partials by one reduction.

        A tree's inner adds have exactly one use, their parent; its leaves are anything. It qualifies when one of
        its leaves is, possibly through a division by a constant (tf's l2_loss halves), a variadic reduce result.
        """
        collapsed = leaves_total = 0
        adds = [op.operation for op in block.operations if is_scalar_add(op.operation)]
        for root in adds:
            if not root.attached or single_add_user(root.results[0]) is not None:
                continue  # an inner node, or removed by an earlier rewrite
            leaves = tree_leaves(root)
            if len(leaves) < 3 or not any(from_batched_norm(v) for v in leaves):
                continue
            elt = fir.element_type(root.results[0])
            with ir.InsertionPoint(root), root.location:
                one = ir.RankedTensorType.get([1], elt)
                stacked = hlo.ConcatenateOp([hlo.reshape(one, v) for v in leaves], 0).result
                zero = hlo.ConstantOp(ir.DenseElementsAttr.get_splat(fir.scalar_type(elt), ir.FloatAttr.get(elt, 0.0)))
                red = hlo.ReduceOp([fir.scalar_type(elt)], [stacked], [zero.result], [0])
                fir.add_body(red.operation, elt, 1)
            root.results[0].replace_all_uses_with(red.results[0])
            erase_tree(root)
            collapsed += 1
            leaves_total += len(leaves)
        return collapsed, leaves_total




def _not_reading_sums(block: ir.Block, found: list[SumOfSquares]) -> tuple[list[SumOfSquares], int]:
    """`found` without the sums whose input depends on one of their results (Adafactor's rms of its update, which
    reads the clipped gradient): batched with that one, a variadic reduce would read its own result. One forward
    pass over the block; returns the rest and how many were left out."""
    tainted: set[ir.Value] = {r for s in found for r in s.reduce.results}
    for op in block.operations:
        op = op.operation
        if any(o in tainted for o in op.operands):
            tainted.update(op.results)
    keep = [s for s in found if s.square not in tainted]
    return keep, len(found) - len(keep)


def _norm_depths(block: ir.Block, found: list[SumOfSquares]) -> dict[ir.Value, int]:
    """How many of the `found` sums of squares lie on the longest path to each value (in one pass, in order).
    Two sums whose squares have the same depth are independent, so one variadic reduce may compute both; a square
    computed from another's norm (adafactor clips each update by its own RMS after packed chains mix them, optax
    chains may scale by a norm before taking another) is deeper, and batching it would make a cycle."""
    reduces = {s.reduce for s in found}
    depth: dict[ir.Value, int] = {}
    for op in block.operations:
        op = op.operation
        d = max((depth.get(v, 0) for v in fir.used_values(op)), default=0)
        if op in reduces:
            d += 1
        for r in op.results:
            depth[r] = d
    return depth
