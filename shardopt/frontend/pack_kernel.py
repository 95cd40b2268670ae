"""One `stablehlo.composite "shardopt.<kernel>_pack"` per pack whose whole update a compiled kernel can do.

A pack keeps its members' slots in one buffer per slot while the variables stay the user's arrays
(core/packing.py). When every member of a pack (flat, or rows sharded on dim 0: `lower-to-kernels` runs the
kernel per device on the local rows, passes/kernel_regions.py) has a dense gradient this step and the
definition has a kernel for it (`kernel_spec()`), the members' updates are wrapped in one composite of
(lr, t, iterations, packed slots..., variables..., gradients...) -> (packed slots..., variables...).
`lower-to-kernels` turns it into one multi-tensor custom call (the variables and gradients are separate
operands, so nothing is gathered, and everything updates in place) or inlines it; its decomposition is
exactly the per-member math `make_step_fn` traces without it, so the inlined IR, and what `fuse-moments` makes
of it, is unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from shardopt.core.contract import EMA_SLOT, OPTIMIZER_STATE, StepContract, StepEntry
from shardopt.core.packing import PackGroup
from shardopt.kernels import DTYPES as KERNEL_DTYPES
from shardopt.kernels import KERNELS, PACK_SUFFIX


def pack_kernel_spec(rule: Any, pack: PackGroup, entries: dict[str, StepEntry],
                     dense: dict[str, bool]) -> tuple[str, dict[str, Any]] | None:
    """(kind, attributes) when `pack`'s whole update can be one kernel composite this step, else None.

    Needs: every member updated this step with a dense gradient of its own shape (`dense`); float32
    math; slots of the member's shape and no EMA; one weight-decay setting for all members; a definition kind with
    a pack kernel."""
    spec_fn = getattr(rule, "kernel_spec", None)
    spec = spec_fn() if spec_fn is not None else None
    if spec is None or spec[0] + PACK_SUFFIX not in KERNELS or rule.use_ema:
        return None
    members = [entries.get(m.name) for m in pack.members]
    if any(e is None or not dense.get(e.name, False) or e.grad_shape is not None for e in members):
        return None
    if pack.dtype not in KERNEL_DTYPES:
        return None
    if len({e.weight_decay for e in members}) != 1:
        return None
    names = [s for s in members[0].slots if s != EMA_SLOT]
    if any([s for s in e.slots if s != EMA_SLOT] != names or any(e.slot_shape(s) != e.shape for s in names)
           for e in members):
        return None
    kind, attributes = spec
    wd = rule.weight_decay if members[0].weight_decay else None
    return kind, {**attributes, "has_weight_decay": wd is not None, "weight_decay": float(wd or 0.0),
                  "slots": ",".join(names), "members": len(members), "pack": pack.name}


def select_kernel_packs(rule: Any, contract: StepContract, entries: list[StepEntry]
                        ) -> list[tuple[PackGroup, tuple[str, dict[str, Any]]]]:
    """The packs of `contract` updated through one kernel composite each this step: none with optimizer-level
    state or `skip_nonfinite` (both read or gate every member's update)."""
    if contract.args_with_role(OPTIMIZER_STATE) or getattr(rule, "update_tree", None) is not None:
        return []
    names = {a.name for a in contract.args}
    by_name = {e.name: e for e in entries}
    dense = {e.name: f"grad_indices/{e.name}" not in names for e in entries}
    out = []
    for pack in contract.packs:
        spec = pack_kernel_spec(rule, pack, by_name, dense)
        if spec is not None:
            out.append((pack, spec))
    return out


def pack_update(update: Callable[..., Any], pack: PackGroup, spec: tuple[str, dict[str, Any]],
                entries: dict[str, StepEntry], variables: dict[str, jax.Array], grads: dict[str, jax.Array],
                packed_slots: dict[str, jax.Array], t: jax.Array, lr_c: jax.Array, iterations: jax.Array
                ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The pack's members updated through one composite: (new variables by name, new packed slots by slot name).

    `update` is `frontend/step.py`'s traced `update_entry`; `grads` are the members' clipped gradients in the
    compute dtype; `packed_slots` the pack's slot buffers by slot name."""
    kind, attributes = spec
    names = attributes["slots"].split(",")
    member_names = [m.name for m in pack.members]
    k = len(member_names)

    def decomposition(lr: jax.Array, t_: jax.Array, it: jax.Array, *operands: jax.Array, **_: Any
                      ) -> tuple[jax.Array, ...]:
        slot_values = dict(zip(names, operands[:len(names)], strict=True))
        ps, gs = operands[len(names):len(names) + k], operands[len(names) + k:]
        new_ps, new_slots = [], {s: [] for s in names}
        for i, (name, p, g) in enumerate(zip(member_names, ps, gs, strict=True)):
            own = {s: pack.unpack(slot_values[s], i) for s in names}
            p_new, s_new = update(dataclasses.replace(entries[name], name=""), p, g, None, own, t_, lr, it, {},
                                  kernel=False)
            new_ps.append(p_new)
            for s in names:
                new_slots[s].append(s_new[s])
        return (*(pack.pack(new_slots[s]) for s in names), *new_ps)

    composite = jax.lax.composite(decomposition, name=f"shardopt.{kind}{PACK_SUFFIX}")
    operands = [packed_slots[s] for s in names] + [variables[n] for n in member_names] + \
        [grads[n] for n in member_names]
    out = composite(lr_c, t, iterations, *operands, **attributes)
    new_slots = dict(zip(names, out[:len(names)], strict=True))
    return dict(zip(member_names, out[len(names):], strict=True)), new_slots
