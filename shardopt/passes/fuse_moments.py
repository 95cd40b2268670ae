"""`fuse-moments`: horizontal fusion of the per-variable update chains (variable, m, v, ... of each variable).

A *unit* is everything `@main` computes elementwise for one variable: the backward slice of the results that
replace the variable and its slots, down to *leaves*: tensors (the variable, slots, gradient, a densified sparse
gradient), splat constants, broadcasts of scalars (learning-rate factors, the clip scale) and rank-0 operands
(a `select` predicate). Units whose op DAGs are isomorphic (same ops, attributes, element types and wiring, so the
same dtype) and whose layouts pack the same way form a group. For each group the pass packs every tensor leaf
into one tensor, runs the chain once on the packed tensors and slices each result back to its variable; `cleanup`
then deletes the dead per-variable ops. Elementwise math on packed data is bitwise the same as per variable.

Where the results go decides whether fusing pays:
- **Packed state** (core/packing.py, what every step runs): a pack's slots arrive as one buffer each, members
  are cut out (`slice`, `reshape`) and the results are packed again (`concatenate`). The pass knows a packed
  result from its IR attributes alone (`shardopt.pack`, and `shardopt.members` naming the member of each
  concatenated piece; jax's concatenate trees are flattened first). A unit is one member: its packed slot
  results and its own variable result. The slot chains of a group run once on the packed buffers; after fusing,
  the pass folds `concatenate` of consecutive slices into the sliced buffer itself, so the cut-outs of the state
  and the re-packing disappear: the chain reads the packed state and its result *is* the packed result. Only the
  gradients are concatenated (into the pack's donated gradient buffer). Each variable, the user's own array,
  keeps its own small update, which now reads its slice of the new packed slots: on XLA:CPU 2 loop kernels over
  the pack plus one small kernel per variable, instead of 3 per variable, and 2 result buffers per pack.
- **One result buffer per variable** (`compile()`'s calling convention): XLA:CPU writes every result buffer with
  its own loop kernel (no multi-output loop fusion), so after fusing it re-fuses the packed chain into one kernel
  per slice and materialises the concatenated inputs: more bytes, temp memory and compile time. Measured (2000 x
  f32[3700], one device): 6002 -> 6003 loop kernels, 0 -> 118 MB temp, XLA compile 13 s -> 157 s, step about 4x
  slower; GPT-2 small on the 2x4 mesh: step about 6x slower. So `fuse-moments` leaves such units alone
  ("results not packed") and `fuse-moments{unpacked=true}` fuses them too, for tests that pin this XLA
  behaviour (tests/test_pass_fuse_moments.py).

Packing keeps every device's data local (no transposes, no collectives):
- replicated layouts: flatten each tensor and concatenate (`[n]`);
- dimension 0 sharded over mesh axes A (S shards), other dims unsharded: reshape to `[S, n/S]` (row k is
  exactly device k's block, because row-major order keeps a dim-0 block contiguous) and concatenate along the
  unsharded dim 1; the packed tensor is pinned to `[{A}, {}]`;
- any other layout with an unsharded dimension u: concatenate along u the tensors whose other dimensions have
  the same sizes and shardings (every device's block of the result is the concatenation of its blocks);
- layouts without an unsharded dimension (e.g. `[batch, model]`) are left unfused and counted.
Packed tensors and packed results carry `sdy.sharding_constraint`s with those layouts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import stablehlo as hlo

from shardopt import ir as sir
from shardopt.core.contract import SLOT, VARIABLE
from shardopt.core.packing import member_layout
from shardopt.passes import fusion_ir as fir
from shardopt.passes.base import ModulePass, PassError, option
from shardopt.passes.inline_calls import inline_composites
from shardopt.passes.update_units import Packing, Sink, Unit, build_unit, packing_for, reading_own_updates


@dataclass(frozen=True)
class FuseMoments(ModulePass):
    """Groups isomorphic per-variable update chains by layout and runs each group once on packed tensors."""

    NAME: ClassVar[str] = "fuse-moments"
    max_group: int = option(0, "most variables fused into one chain (0: no limit)")
    unpacked: bool = option(False, "also fuse variables returned in buffers of their own (slower on XLA:CPU)")

    def __post_init__(self) -> None:
        self.check(self.max_group >= 0, "max-group", "non-negative")

    def run(self, module: ir.Module) -> dict[str, Any]:
        inline_composites(module)  # kernel markers lower-to-kernels did not see (a pipeline without it)
        fir.run_textual(module, "cse")  # one value per shared scalar (lr factors, clip scale), so groups share it
        ops_before = sum(sir.op_counts(module).values())
        fn = sir.main_func(module)
        fir.flatten_concatenates(fn)
        block = fn.regions[0].blocks[0]
        ret = list(block.operations)[-1].operation
        mesh = sir.mesh_axes(module)
        skipped: Counter[str] = Counter()
        sinks: list[Sink] = []
        units = self._units(fn, ret, sinks, skipped)
        groups: dict[tuple[str, str, tuple[bool, ...]], list[tuple[Unit, Packing]]] = {}
        for unit in units.values():
            if not unit.packed and not self.unpacked:
                skipped["results not packed"] += len(unit.roots)
                continue
            packing, pack_key = packing_for(unit.shape, unit.layout, mesh)
            if packing is None:
                skipped["no unsharded dimension"] += len(unit.roots)
                continue
            kinds = tuple(sinks[j].op.name == "stablehlo.concatenate" for _, j, _ in unit.roots)
            groups.setdefault((unit.fingerprint, pack_key, kinds), []).append((unit, packing))
        sizes: Counter[int] = Counter()
        fused_groups = packed_leaves = 0
        position = {op.operation: i for i, op in enumerate(block.operations)}
        chunks = []
        for members in groups.values():
            limit = self.max_group or len(members)
            for i in range(0, len(members), limit):
                chunk = members[i:i + limit]
                sizes[len(chunk)] += 1
                if len(chunk) > 1:
                    # The packed chain goes before the first op that takes one of its results (a pack's concat
                    # or the return); everything it reads is defined before that. Found before any rewriting.
                    anchor = min((sinks[j].op for u, _ in chunk for _, j, _ in u.roots), key=position.__getitem__)
                    chunks.append((chunk, anchor))
        late: list[ir.Operation] = []  # ops that now read a packed result but sit before it
        for chunk, anchor in chunks:
            with ir.InsertionPoint(anchor), ret.location:
                packed_leaves += _fuse(chunk, ret, sinks, late, self.unpacked)
            fused_groups += 1
        # positions anew: an Operation's hash follows its operands, which the fusion has just rewired
        moved = _move_after_packed(late, {op.operation: i for i, op in enumerate(block.operations)}, ret)
        folded = 0
        if fused_groups:
            fir.run_textual(module, "canonicalize")  # reshape(reshape(x)) -> x: packed pieces become slices
            folded = fir.fold_concatenated_slices(sir.main_func(module))
        return {
            "units": len(units),
            "groups": fused_groups,
            "tensors_per_group": {str(k): v for k, v in sorted(sizes.items())},
            "packed_leaves": packed_leaves,
            "pack_copies_folded": folded,
            "variable_updates_moved": moved,
            "results_unfused": dict(skipped),
            "ops_before": ops_before,
            "ops_after": sum(sir.op_counts(module).values()),
        }

    @staticmethod
    def _units(fn: Any, ret: ir.Operation, sinks: list[Sink], skipped: Counter[str]) -> dict[Any, Unit]:
        """One unit per variable: its variable result and slot results, wherever they go (read from the IR's
        `shardopt.*` attributes: role, name, owner, slot, pack and the pack's members)."""
        units: dict[Any, Unit] = {}
        for j, attrs in enumerate(sir.result_attrs(fn)):
            role = sir.string_attr(attrs.get("shardopt.role"))
            name = sir.string_attr(attrs.get("shardopt.name")) or ""
            if role not in (VARIABLE, SLOT):
                continue
            key = "variable" if role == VARIABLE else sir.string_attr(attrs.get("shardopt.slot"))
            if key is None:
                raise PassError(f"result {name or j}: a slot without `shardopt.slot` (the frontend names every slot)")
            layout = sir.layout_from_sharding(attrs.get("sdy.sharding"))
            if layout is None:
                raise PassError(f"result {name or j}: no closed layout; run propagate-layouts first")
            members = attrs.get("shardopt.members")
            if attrs.get("shardopt.pack") is not None and members is not None:
                member_names = [ir.StringAttr(m).value for m in ir.ArrayAttr(members)]
                concat = fir.op_of(fir.look_through(ret.operands[j]))
                if (concat is None or concat.name != "stablehlo.concatenate"
                        or len(concat.operands) != len(member_names)):
                    skipped["packed result is not one piece per member"] += len(member_names)
                    continue
                for p, (member, piece) in enumerate(zip(member_names, concat.operands, strict=True)):
                    sink = Sink(concat, p, tuple(fir.shape_of(piece)))
                    shape = fir.shape_of(sink.value())
                    unit = units.setdefault(member, Unit(member, shape, member_layout(layout, len(shape))))
                    unit.packed = True
                    sinks.append(sink)
                    unit.roots.append((key, len(sinks) - 1, -1))
                continue
            owner = name if role == VARIABLE else sir.string_attr(attrs.get("shardopt.owner"))
            if owner is None:
                raise PassError(f"result {name or j}: a slot with neither an owner nor a pack")
            unit = units.setdefault(owner, Unit(owner, fir.shape_of(ret.operands[j]), layout))
            sinks.append(Sink(ret, j, tuple(fir.shape_of(ret.operands[j]))))
            unit.roots.append((key, len(sinks) - 1, -1))
        good: dict[Any, Unit] = {}
        for name, unit in units.items():
            reason = build_unit(unit, sinks)
            if reason:
                skipped[reason] += len(unit.roots)
            else:
                good[name] = unit
        for name in reading_own_updates(good, fn.regions[0].blocks[0]):
            skipped["a leaf reduces the update itself"] += len(good.pop(name).roots)
        return good


def _fuse(chunk: list[tuple[Unit, Packing]], ret: ir.Operation, sinks: list[Sink], late: list[ir.Operation],
          all_results: bool) -> int:
    """Emits the packed chain for `chunk` at the insertion point and rewires its results; returns the packed
    leaves. Results that go into a pack take their slice of the packed chain; a result returned in a buffer of
    its own (the user's variable) keeps its per-variable ops, which now read the slices of the packed values
    they used (those ops are collected in `late`: they may sit before the packed chain). With `all_results`
    every result takes its slice of the packed chain (fuse-moments{unpacked=true})."""
    units = [u for u, _ in chunk]
    packing = chunk[0][1]
    pieces = [packing.piece(u.shape) for u in units]
    dim = packing.dim
    packed_shape = list(pieces[0])
    packed_shape[dim] = sum(p[dim] for p in pieces)
    packed: list[ir.Value] = []
    leaves = 0
    for k, node in enumerate(units[0].nodes):
        elt = ir.Type.parse(node.key) if node.kind == "B" else fir.element_type(node.value)
        ptype = ir.RankedTensorType.get(packed_shape, elt)
        same = all(u.nodes[k].value == node.value for u in units)
        if node.kind == "op":
            src = fir.op_of(node.value)
            attrs = {a.name: a.attr for a in src.attributes if not a.name.startswith("sdy.")}  # shape-specific
            new = ir.Operation.create(src.name, results=[ptype], operands=[packed[i] for i in node.operands],
                                      attributes=attrs)
            packed.append(new.result)
        elif node.kind == "C":
            splat = ir.DenseElementsAttr(fir.op_of(fir.look_through(node.value)).attributes["value"])
            packed.append(hlo.ConstantOp(ir.DenseElementsAttr.get_splat(ptype, splat.get_splat_value())).result)
        elif node.kind == "S" and same:
            packed.append(node.value)
        elif node.kind == "B" and same:
            packed.append(hlo.broadcast_in_dim(ptype, node.value, []))
        else:  # tensors, or scalars that differ per variable: concatenate the per-variable pieces
            parts = []
            for u, piece in zip(units, pieces, strict=True):
                v = u.nodes[k].value
                ptype_i = ir.RankedTensorType.get(piece, elt)
                if node.kind in ("B", "S"):
                    parts.append(hlo.broadcast_in_dim(ptype_i, v, []))
                else:
                    parts.append(v if fir.shape_of(v) == piece else hlo.reshape(ptype_i, v))
            packed.append(fir.constraint(hlo.ConcatenateOp(parts, dim).result, packing.layout))
            leaves += 1
    cut: dict[int, list[ir.Value]] = {}

    def parts(root: int) -> list[ir.Value]:
        """The slice of packed node `root` that belongs to each unit, in the packed piece's shape (made once)."""
        if root in cut:
            return cut[root]
        result = fir.constraint(packed[root], packing.layout)
        out, offset = [], 0
        for piece in pieces:
            start, limit = [0] * len(piece), list(piece)
            start[dim], limit[dim] = offset, offset + piece[dim]
            offset += piece[dim]
            out.append(hlo.slice(result, start, limit, [1] * len(piece)))
        cut[root] = out
        return out

    def reshaped(part: ir.Value, shape: Any) -> ir.Value:
        if list(shape) == fir.shape_of(part):
            return part
        return hlo.reshape(ir.RankedTensorType.get(list(shape), fir.element_type(part)), part)

    packed_roots = []
    for r, (_, j, root) in enumerate(units[0].roots):
        into_pack = sinks[j].op.name == "stablehlo.concatenate"
        if not (into_pack or all_results):
            continue  # the variable's own result: its per-variable ops stay (below)
        packed_roots.append(root)
        for u, part in zip(units, parts(root), strict=True):
            sink = sinks[u.roots[r][1]]
            sink.op.operands[sink.index] = reshaped(part, sink.shape)
    if len(packed_roots) < len(units[0].roots):
        for root in dict.fromkeys(packed_roots):
            for u, part in zip(units, parts(root), strict=True):
                old = u.nodes[root].value
                late.extend(use.owner.operation for use in old.uses)
                old.replace_all_uses_with(reshaped(part, u.shape))
    return leaves


def _move_after_packed(late: list[ir.Operation], position: dict[ir.Operation, int], ret: ir.Operation) -> int:
    """Moves `late` and everything that uses them, in their order, to just before `ret`: they now read values of
    a packed chain that was inserted after them. Each op keeps its operands (all defined before its old place)
    and its users (moved with it, in order). Returns the number of ops moved."""
    seen: set[ir.Operation] = set()
    stack = [op for op in late if op in position]
    while stack:
        op = stack.pop()
        if op in seen or op == ret:
            continue
        seen.add(op)
        for result in op.results:
            stack.extend(use.owner.operation for use in result.uses)
    moving = sorted((op for op in seen if op in position), key=position.__getitem__)
    for op in moving:
        op.move_before(ret)
    return len(moving)
