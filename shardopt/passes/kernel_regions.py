"""A kernel's custom call on a multi-device mesh: wrapped in an `sdy.manual_computation` over every mesh axis, so
each device runs the kernel on its own shards, in place, and nothing is gathered.

XLA's partitioner knows nothing of a custom call's semantics: given sharded operands it gathers them, calls the
kernel on whole tensors, and slices the results again. Inside a manual computation the body sees local shards
(block arguments of the local types), so the partitioner passes each device's buffers straight to the call:

    %r:3 = sdy.manual_computation(%p, %m, %v, %alpha, %eps, %g)
             in_shardings=[<@mesh, [{"model"}, {}]>, ..., <@mesh, []>, <@mesh, []>, <@mesh, [{"model"}, {}]>]
             out_shardings=[<@mesh, [{"model"}, {}]> x3] manual_axes={"batch", "model"}
             (%lp: tensor<16x8xf32>, ...) {
      %k:3 = stablehlo.custom_call @shardopt_adam_update(%lp, %lm, %lv, %la, %le, %lg) ...
      sdy.return %k#0, %k#1, %k#2
    }

An elementwise update is local: a variable replicated over an axis is updated identically by every replica (each
holds the same copy and the same gradient); a pack's `[S, N/S]` slots sharded on dim 0 hold, on device k, the
members' dim-0 blocks of device k in member order (core/packing.py), which is the concatenation of the members'
local shards the pack kernel expects. The scalars (alpha, eps, lr, the global-norm clip scale) are computed
before the region over the whole mesh and enter it replicated.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import sdy

from shardopt import ir as sir
from shardopt.kernels.calls import KernelCall
from shardopt.kernels.stablehlo import custom_call


def needs_region(axes: dict[str, int]) -> bool:
    """Whether a kernel call on this mesh must run per device (some axis has more than one device)."""
    return any(size > 1 for size in axes.values())


def replicated(rank: int) -> ir.Attribute:
    """The closed replicated sharding of a rank-`rank` value on the module's mesh."""
    return sir.sharding_attr((None,) * rank, rank)


def sharding_problem(sharding: ir.Attribute | None, t: ir.Type, axes: dict[str, int]) -> str | None:
    """Why a value of type `t` with `sharding` cannot enter a manual region over every axis, or None: the sharding
    must be closed, name whole axes of the mesh, and split each dimension evenly."""
    if sharding is None:
        return "state without a sharding on a multi-device mesh"
    shape = ir.RankedTensorType(t).shape
    ts = sdy.TensorShardingAttr(sharding)
    if str(ts.mesh_or_ref) != f"@{sir.MESH_NAME}" or len(ts.dimension_shardings) != len(shape):
        return "state sharded on another mesh"
    for d, extent in zip(ts.dimension_shardings, shape, strict=True):
        dim = sdy.DimensionShardingAttr(d)
        if not dim.is_closed:
            return "state with an open sharding"
        n = 1
        for a in dim.axes:
            name = sdy.AxisRefAttr(a).name
            if name not in axes or ":" in str(a):
                return "state sharded over a sub-axis or an unknown axis"
            n *= axes[name]
        if extent % n:
            return "state not divisible by its mesh axes"
    return None


def local_type(t: ir.Type, sharding: ir.Attribute, axes: dict[str, int]) -> ir.RankedTensorType:
    """The type of one device's shard of a value of type `t` sharded as `sharding` (checked by
    `sharding_problem`)."""
    rt = ir.RankedTensorType(t)
    shape = [extent // _product(dims, axes) for extent, (dims, _) in
             zip(rt.shape, sir.sharding_dims(sharding), strict=True)]
    return ir.RankedTensorType.get(shape, rt.element_type)


def _product(names: Sequence[str], axes: dict[str, int]) -> int:
    n = 1
    for a in names:
        n *= axes[a]
    return n


def manual_custom_call(call: KernelCall, operands: Sequence[ir.Value], shardings: Sequence[ir.Attribute],
                       axes: dict[str, int]) -> ir.Operation:
    """`custom_call(call, operands)` run per device: an `sdy.manual_computation` over every axis of `axes` whose
    in-shardings are `shardings` (one per operand, each checked by `sharding_problem`), whose out-shardings are
    those of the state operands the results alias, and whose body calls the kernel on the local shards. Returns
    the region op; its results are the call's, in global types."""
    operands, shardings = list(operands), list(shardings)
    if len(operands) != len(shardings):
        raise ValueError(f"{len(operands)} operands but {len(shardings)} shardings")
    aliases = call.aliases
    aliased = sorted(aliases, key=aliases.get)  # operand index of each result, in result order
    result_types = [operands[i].type for i in aliased]
    region = sdy.ManualComputationOp(
        result_types, operands,
        sdy.TensorShardingPerValueAttr.get(shardings),
        sdy.TensorShardingPerValueAttr.get([shardings[i] for i in aliased]),
        sdy.ManualAxesAttr.get([ir.StringAttr.get(a) for a in axes]))
    local = [local_type(v.type, s, axes) for v, s in zip(operands, shardings, strict=True)]
    body = region.body.blocks.append(*local)
    with ir.InsertionPoint(body):
        kernel = custom_call(call, list(body.arguments))
        sdy.ReturnOp(list(kernel.results))
    return region.operation


def region_shardings(owners: Sequence[ir.Value | None], main: ir.Operation, block: ir.Block,
                     axes: dict[str, int]) -> list[ir.Attribute | None] | str:
    """The in-shardings of a kernel call's operands, each that of its owner (the `@main` argument whose layout
    it has: the state operand itself, or the variable a gradient belongs to; None: a replicated scalar), or why
    the call cannot run per device."""
    all_attrs = main.arg_attrs  # one argument's dictionary at a time: decoding them all per call is quadratic
    out: list[ir.Attribute | None] = []
    for owner in owners:
        if owner is None:
            out.append(None)
            continue
        if not (isinstance(owner.owner, ir.Block) and owner.owner == block):
            return "state is not a @main argument"
        attrs = ir.DictAttr(all_attrs[ir.BlockArgument(owner).arg_number])
        sharding = attrs["sdy.sharding"] if "sdy.sharding" in attrs else None
        why = sharding_problem(sharding, owner.type, axes)
        if why is not None:
            return why
        out.append(sharding)
    return out


def pack_problem(slot: ir.Attribute, members: Sequence[ir.Attribute]) -> str | None:
    """Why a pack whose slots are sharded as `slot` and whose variables as `members` is not laid out as
    core/packing.py packs (each device's slot row = its members' local shards in order), or None."""
    first, *rest = sir.sharding_dims(slot)
    if any(dims for dims, _ in rest):
        return "packed slots sharded beyond dim 0"
    for m in members:
        dims = sir.sharding_dims(m)
        if (dims[0][0] if dims else ()) != first[0] or any(d for d, _ in dims[1:]):
            return "pack member laid out unlike its packed slots"
    return None


def emit(call: KernelCall, operands: Sequence[ir.Value], shardings: Sequence[ir.Attribute | None] | None,
         axes: dict[str, int]) -> ir.Operation:
    """The kernel's custom call on `operands`; per device in a manual region when `shardings` is given (None
    entries: replicated scalars)."""
    if shardings is None:
        return custom_call(call, operands)
    full = [s if s is not None else replicated(ir.RankedTensorType(v.type).rank)
            for v, s in zip(operands, shardings, strict=True)]
    return manual_custom_call(call, operands, full, axes)


def call_shardings(call: KernelCall, owner_of: dict[str, ir.Value], trailing: Sequence[ir.Value], main: ir.Operation,
                   block: ir.Block, axes: dict[str, int], pack: bool = False
                   ) -> list[ir.Attribute | None] | str | None:
    """In-shardings for `call`'s operands on this mesh: None where one device holds everything (no region), why
    not where the call cannot run per device, else one per operand (`owner_of`: the `@main` argument whose layout
    each named state operand has, the others are replicated scalars; `trailing`: the same for the operands after
    the named ones). `pack`: also check the pack layout (`pack_problem`)."""
    if not needs_region(axes):
        return None
    out = region_shardings([owner_of.get(n) for n in call.operands] + list(trailing), main, block, axes)
    if isinstance(out, str) or not pack:
        return out
    why = pack_problem(out[call.operands.index("m")], out[len(call.operands):len(call.operands) + call.variables])
    return why if why is not None else out


def unmarked_state_sharded(main: ir.Operation, block: ir.Block, marked: Sequence[ir.Value]) -> dict[str, int]:
    """`state_sharded_unmarked`: variables asking for `shardopt.shard_state_over` that no kernel composite reads
    (the frontend leaves an update whose slots are sharded beyond the variable to XLA); empty if none asks."""
    asked = [i for i, a in enumerate(sir.arg_attrs(main)) if "shardopt.shard_state_over" in a]
    if not asked:
        return {}
    read = {ir.BlockArgument(v).arg_number for v in marked if isinstance(v.owner, ir.Block) and v.owner == block}
    return {"state_sharded_unmarked": sum(i not in read for i in asked)}
