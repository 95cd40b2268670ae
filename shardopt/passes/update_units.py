"""What `fuse-moments` fuses: one variable's update as a DAG of elementwise ops over leaves (a *unit*), where its
results go (*sinks*), and how a layout packs (*packing*). See the fuse_moments module docstring."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from jaxlib.mlir import ir

from shardopt.passes import fusion_ir as fir
from shardopt.passes.base import PassError


@dataclass
class Node:
    """One value of a unit's DAG: an interior elementwise op or a leaf (`kind` T, C, B or S)."""

    kind: str                      # "op", "T" tensor leaf, "C" splat constant, "B" broadcast scalar, "S" rank-0
    value: ir.Value                # the value in the original IR (for "B", the scalar that is broadcast)
    operands: tuple[int, ...] = ()
    key: str = ""


@dataclass
class Unit:
    """The update of one variable: its DAG and where its results go (sinks: `func.return` or a pack's concat)."""

    name: str
    shape: list[int]
    layout: tuple[Any, ...]
    nodes: list[Node] = field(default_factory=list)
    roots: list[tuple[str, int, int]] = field(default_factory=list)  # (result key, sink index, node index)
    fingerprint: str = ""
    packed: bool = False                                              # results go into packed buffers


@dataclass(frozen=True)
class Sink:
    """An operand slot that receives one variable's new value: `op.operands[index]`, of shape `shape`."""

    op: ir.Operation
    index: int
    shape: tuple[int, ...]

    def value(self) -> ir.Value:
        """The per-variable value flowing in (through sharding constraints and a packing reshape)."""
        value = fir.look_through(self.op.operands[self.index])
        producer = fir.op_of(value)
        if self.op.name == "stablehlo.concatenate" and producer is not None and producer.name == "stablehlo.reshape":
            value = fir.look_through(producer.operands[0])
        return value


@dataclass(frozen=True)
class Packing:
    """How a layout packs: `piece(shape)` is each tensor's shape in the packed tensor, concatenated on `dim`."""

    kind: str
    dim: int
    layout: tuple[Any, ...]
    shards: int = 1

    def piece(self, shape: list[int]) -> list[int]:
        n = int(np.prod(shape))
        return {"flat": [n], "rows": [self.shards, n // self.shards]}.get(self.kind, shape)


def packing_for(shape: list[int], layout: tuple[Any, ...], mesh: dict[str, int]) -> tuple[Packing | None, str]:
    """The packing of a tensor of `shape` laid out as `layout` and the part of the group key it fixes."""
    if all(e is None for e in layout):
        return Packing("flat", 0, (None,)), "flat"
    axes = [(e,) if isinstance(e, str) else tuple(e or ()) for e in layout]
    unknown = [a for dim in axes for a in dim if a not in mesh]
    if unknown:
        raise PassError(f"layout {layout} names mesh axes {unknown} that the module's mesh {mesh} lacks")
    if axes[0] and all(not a for a in axes[1:]):
        shards = int(np.prod([mesh[a] for a in axes[0]]))
        return Packing("rows", 1, (layout[0], None), shards), f"rows:{layout[0]}"
    free = [d for d, a in enumerate(axes) if not a]
    if not free:
        return None, ""
    u = free[0]
    rest = [n for d, n in enumerate(shape) if d != u]
    return Packing("dim", u, tuple(layout)), f"dim{u}:{rest}:{layout}"


def build_unit(unit: Unit, sinks: list[Sink]) -> str:
    """Fills `unit.nodes` and its fingerprint; returns why the unit cannot be fused ("" if it can)."""
    unit.roots.sort()
    if not unit.shape:
        return "scalar variable"
    index: dict[ir.Value, int] = {}
    for pos, (key, j, _) in enumerate(unit.roots):
        value = sinks[j].value()
        if fir.shape_of(value) != unit.shape:
            return "result shape differs from its variable"
        owner = value.owner
        if not isinstance(owner, ir.Block) and getattr(owner, "operation", owner).name == "stablehlo.custom_call":
            return "updated by a compiled kernel"  # lower-to-kernels
        root = visit(unit, value, index)
        if unit.nodes[root].kind != "op":
            return "result is not computed elementwise"
        unit.roots[pos] = (key, j, root)
    parts = [f"{n.kind}{n.key}{n.operands}" for n in unit.nodes]
    unit.fingerprint = ";".join(parts) + "|" + ",".join(f"{k}={r}" for k, _, r in unit.roots)
    return ""


def visit(unit: Unit, top: ir.Value, index: dict[ir.Value, int]) -> int:
    """Post-order numbering of the DAG under `top` (iterative: chains can be long)."""
    stack: list[tuple[ir.Value, bool]] = [(top, False)]
    while stack:
        value, expanded = stack.pop()
        if value in index:
            continue
        op = fir.op_of(value)
        shape = fir.shape_of(value)
        interior = (op is not None and op.name in fir.ELEMENTWISE and shape == unit.shape
                    and all(fir.shape_of(o) in (shape, []) for o in op.operands))
        if interior and fir.splat_key(value) is None:
            operands = [fir.look_through(o) for o in op.operands]
            if not expanded:
                stack.append((value, True))
                stack.extend((o, False) for o in reversed(operands) if o not in index)
                continue
            attrs = ",".join(sorted(f"{a.name}={a.attr}" for a in op.attributes))
            node = Node("op", value, tuple(index[o] for o in operands),
                        f"{op.name}[{attrs}]->{fir.element_type(value)}")
        elif not shape:
            node = Node("S", value, key=str(value.type))
        elif fir.splat_key(value) is not None:
            node = Node("C", value, key=fir.splat_key(value) or "")
        elif op is not None and op.name == "stablehlo.broadcast_in_dim" and not fir.shape_of(op.operands[0]):
            node = Node("B", fir.look_through(op.operands[0]), key=str(fir.element_type(value)))
        else:
            node = Node("T", value, key=str(fir.element_type(value)))
        index[value] = len(unit.nodes)
        unit.nodes.append(node)
    return index[top]


def reading_own_updates(units: dict[Any, Unit], block: ir.Block) -> set[Any]:
    """The units a leaf of which is computed from some unit's own elementwise ops, e.g. Adafactor's
    `u / max(1, rms(u))`: the broadcast rms is a leaf, but it reduces the unit's own `u`. The packed chain is
    emitted in one place, before its first sink, so such a leaf cannot be ready for it: those units stay unfused.
    One forward pass over the block marks every value that depends on an interior op of any unit."""
    tainted: set[ir.Value] = {n.value for u in units.values() for n in u.nodes if n.kind == "op"}
    if not tainted:
        return set()
    interior = set(tainted)
    for op in block.operations:
        op = op.operation
        if any(o in tainted for o in op.operands):
            tainted.update(op.results)
    return {name for name, u in units.items()
            if any(n.kind != "op" and n.value in tainted and n.value not in interior for n in u.nodes)}
