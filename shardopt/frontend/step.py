"""Builds the pure, flat step function that the frontend lowers: one call = one `apply_gradients`.

Its arguments and results are the step contract's (`core/contract.py`), looked up by name, never by position
arithmetic. tf-keras's order of work: schedule at the pre-increment counter, clip raw gradients, de-duplicate
sparse rows, weight decay, the definition's update per variable, EMA (and its overwrite), counter increment.
Slots of packed variables are cut out of their packed buffers, updated like any slot, and packed again;
`fuse-moments` turns that into one update per pack.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from shardopt.core.contract import (
    COUNTER_NAME,
    EMA_SLOT,
    GRADIENT_BUFFER,
    LEARNING_RATE_NAME,
    OPTIMIZER_STATE,
    SKIPPED_STEPS,
    SLOT,
    StepContract,
    StepEntry,
    gradient_name,
    packed_name,
)
from shardopt.core.layout import state_layout
from shardopt.core.packing import PackGroup
from shardopt.frontend import clipping
from shardopt.frontend.pack_kernel import pack_update, select_kernel_packs

State = dict[str, jax.Array]


class UpdateRule(Protocol):
    """What the frontend needs of an optimizer definition: the shared options and one variable's math."""

    weight_decay: float | None
    clipnorm: float | None
    clipvalue: float | None
    global_clipnorm: float | None
    use_ema: bool
    ema_momentum: float
    ema_overwrite_frequency: int | None

    def update_dense(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                     ) -> tuple[jax.Array, State]: ...

    def update_sparse(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                      ) -> tuple[jax.Array, State]: ...

    def update_global(self, state: State, t: jax.Array) -> State: ...

    # Optional, instead of the per-variable methods: `update_tree(entries, variables, grads, slots, state,
    # iterations) -> (variables, slots, state)` updates every variable at once (dense gradients of the variables'
    # shapes, by entry name; `state`: the optimizer-level state). `from_optax` traces optax's update through it.


def compute_dtype(dtype: Any) -> np.dtype:
    """Half-precision variables are updated in float32 and rounded once (shardopt's decision, spec top)."""
    dt = np.dtype(dtype)
    return np.dtype(np.float32) if dt.itemsize < 4 else dt


def _densify(values: jax.Array, indices: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """De-duplicated sparse rows as a dense tensor: duplicate rows are summed (tf's unsorted_segment_sum)."""
    return jnp.zeros(shape, values.dtype).at[indices].add(values, mode="drop")


def make_step_fn(rule: UpdateRule, contract: StepContract, entries: list[StepEntry], schedule: Any | None
                 ) -> Callable[..., tuple[jax.Array, ...]]:
    """The flat step for `entries` under `rule` (everything but the learning rate is a compile-time constant)."""
    positions = {a.name: i for i, a in enumerate(contract.args)}
    members = contract.member_of()
    packed_slots = [a for a in contract.args if a.role == SLOT and a.pack is not None]
    traced = _traced_once(rule)
    kernel_packs = select_kernel_packs(rule, contract, entries)
    in_kernel_pack = {m.name for p, _ in kernel_packs for m in p.members}

    def step(*flat: jax.Array) -> tuple[jax.Array, ...]:
        arg = dict(zip((a.name for a in contract.args), flat, strict=True))
        iterations = arg[COUNTER_NAME]
        lr = schedule(iterations) if schedule is not None else arg[LEARNING_RATE_NAME]
        lr = jnp.asarray(lr, jnp.float32)

        slots: dict[str, dict[str, jax.Array]] = {}
        for e in entries:
            packed = members.get(e.name)
            if packed is None:
                slots[e.name] = {s: arg[f"{s}/{e.name}"] for s in e.slots}
            elif e.name not in in_kernel_pack:  # a kernel pack's composite reads its packed slots whole
                pack, index = packed
                slots[e.name] = {s: pack.unpack(arg[f"{s}/{pack.name}"], index) for s in e.slots}
        variables = {e.name: arg[e.name] for e in entries}
        grads = [(arg[gradient_name(e.name)], arg.get(f"grad_indices/{e.name}")) for e in entries]
        # Optimizer-level state advances once per step, before the variables; they read its new values.
        glob = {a.name: arg[a.name] for a in contract.args_with_role(OPTIMIZER_STATE)}
        skipped = glob.pop(SKIPPED_STEPS, None)  # present with skip_nonfinite
        old_glob = dict(glob)
        update_tree = getattr(rule, "update_tree", None)
        if update_tree is not None:  # a rule of the whole tree at once (from_optax): no per-variable options
            dense = [jnp.broadcast_to(g if idx is None else _densify(g, idx, e.shape), e.shape)
                     for e, (g, idx) in zip(entries, grads, strict=True)]
            new_vars, new_slots, glob = update_tree(entries, variables, dense, slots, glob, iterations)
        else:
            if glob:
                glob = dict(rule.update_global(glob, (iterations + 1).astype(jnp.float32)))
            new_vars, new_slots = _update_entries(rule, traced, entries, variables, grads, slots, iterations, lr,
                                                  glob, loose={e.name for e in entries if e.name not in members
                                                               and not _state_sharded(e, contract)},
                                                  kernel_packs=kernel_packs, packed_args=arg)
        step_taken = jnp.asarray(1, iterations.dtype)
        if skipped is not None:  # skip_nonfinite: keep every old value unless all gradients are finite
            finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g, _ in grads]))
            new_vars = {n: jnp.where(finite, v, variables[n]) for n, v in new_vars.items()}
            new_slots = {n: {s: jnp.where(finite, v, slots[n][s]) for s, v in own.items()}
                         for n, own in new_slots.items()}
            glob = {k: jnp.where(finite, v, old_glob[k]) if k in old_glob else v for k, v in glob.items()}
            glob[SKIPPED_STEPS] = skipped + jnp.where(finite, 0.0, 1.0).astype(skipped.dtype)
            step_taken = finite.astype(iterations.dtype)

        out: dict[str, jax.Array] = dict(new_vars)
        out.update(glob)
        for e in entries:
            if e.name not in members:
                out.update({f"{s}/{e.name}": new_slots[e.name][s] for s in e.slots})
        for spec in packed_slots:  # members without a gradient in this step keep their slots as they were
            if spec.name in new_slots:  # updated whole by a kernel pack's composite
                out[spec.name] = new_slots[spec.name]
                continue
            pack = contract.pack(spec.pack)
            out[spec.name] = pack.pack([new_slots[m.name][spec.slot] if m.name in new_slots
                                        else pack.unpack(arg[spec.name], i) for i, m in enumerate(pack.members)])
        for spec in contract.args_with_role(GRADIENT_BUFFER):
            out[spec.name] = _gathered_gradients(contract.pack(spec.pack), entries, grads)
        out[COUNTER_NAME] = iterations + step_taken
        out[LEARNING_RATE_NAME] = lr
        for spec in contract.results:
            if spec.name not in out:  # state the definition does not change (optimizer state so far)
                out[spec.name] = flat[positions[spec.name]]
        return tuple(out[r.name] for r in contract.results)

    return step


def _state_sharded(e: StepEntry, contract: StepContract) -> bool:
    """Whether `propagate-layouts` will shard `e`'s slots beyond its layout (then its update must not become a
    whole-tensor kernel call)."""
    if not e.shard_state_over:
        return False
    lay, _ = state_layout(e.shape, e.layout, e.shard_state_over, dict(contract.mesh_axes))
    return lay is not None and tuple(lay) != tuple(e.layout)


def _gathered_gradients(pack: PackGroup, entries: list[StepEntry],
                        grads: list[tuple[jax.Array, jax.Array | None]]) -> jax.Array:
    """The pack's gradients concatenated as `fuse-moments` concatenates them for its chain (so `cleanup`'s CSE
    makes them one value, which XLA then writes into the donated gradient buffer instead of a temporary). Members
    without a dense gradient of their own shape and dtype contribute zeros: the buffer is scratch, never read."""
    dense = {e.name: g for e, (g, idx) in zip(entries, grads, strict=True) if idx is None and e.grad_shape is None}
    pieces = []
    for m in pack.members:
        g = dense.get(m.name)
        pieces.append(g if g is not None and g.dtype == np.dtype(pack.dtype)
                      else jnp.zeros(m.shape, np.dtype(pack.dtype)))
    return pack.pack(pieces)


def _update_entries(rule: UpdateRule, update: Callable[..., Any], entries: list[StepEntry],
                    variables: dict[str, jax.Array], grads: list[tuple[jax.Array, jax.Array | None]],
                    slots: dict[str, dict[str, jax.Array]], iterations: jax.Array, lr: jax.Array,
                    glob: dict[str, jax.Array], loose: set[str] | frozenset[str] = frozenset(),
                    kernel_packs: list[tuple[PackGroup, tuple[str, dict[str, Any]]]] = (),
                    packed_args: dict[str, jax.Array] | None = None
                    ) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """Clipping, densifying, weight decay, the definition's update and EMA for every entry (by name). The
    members of `kernel_packs` are updated through one composite per pack, whose new packed slots come back in
    the slots dict under their packed names."""
    # Half-precision gradients are clipped in float32 too: a float16 sum of squares overflows at a norm of 256,
    # which would turn every gradient into NaN (global) or zero (per tensor).
    raw = [g.astype(compute_dtype(e.dtype)) for e, (g, _) in zip(entries, grads, strict=True)]
    clipped = clipping.clip_gradients(raw, rule.clipnorm, rule.global_clipnorm, rule.clipvalue)

    new_vars: dict[str, jax.Array] = {}
    new_slots: dict[str, Any] = {}
    per_dtype: dict[np.dtype, tuple[jax.Array, jax.Array]] = {}  # (t, lr) once per compute dtype, not per variable
    in_kernel_pack = {m.name for p, _ in kernel_packs for m in p.members}
    kernel_grads: dict[str, jax.Array] = {}
    for e, g, (_, idx) in zip(entries, clipped, grads, strict=True):
        ct = compute_dtype(e.dtype)
        if ct not in per_dtype:
            per_dtype[ct] = ((iterations + 1).astype(ct), lr.astype(ct))
        if e.name in in_kernel_pack:
            kernel_grads[e.name] = g
            continue
        new_vars[e.name], new_slots[e.name] = update(dataclasses.replace(e, name=""), variables[e.name], g, idx,
                                                     slots[e.name], *per_dtype[ct], iterations, glob,
                                                     kernel=e.name in loose)
    by_name = {e.name: e for e in entries}
    for pack, spec in kernel_packs:
        t, lr_c = per_dtype[np.dtype(np.float32)]
        slot_names = spec[1]["slots"].split(",")
        packed = {s: packed_args[packed_name(s, pack.name)] for s in slot_names}
        pack_vars, pack_slots = pack_update(update, pack, spec, by_name, variables, kernel_grads, packed, t, lr_c,
                                            iterations)
        new_vars.update(pack_vars)
        new_slots.update({packed_name(s, pack.name): x for s, x in pack_slots.items()})
    return new_vars, new_slots


def _traced_once(rule: UpdateRule) -> Callable[..., Any]:
    """`update_entry` under `jax.jit`, keyed by the entry without its name: jax traces the update once per
    distinct (shape, dtype, layout, gradient kind) instead of once per variable, and lowers each call to a
    `func.call` of one shared function that `inline-calls` inlines (2000 same-shaped variables: one trace).
    Kept on the rule itself, so it lives exactly as long as the optimizer."""
    traced = getattr(rule, "_traced_update", None)
    if traced is None:
        traced = jax.jit(functools.partial(update_entry, rule), static_argnums=(0,), static_argnames=("kernel",))
        rule._traced_update = traced  # type: ignore[attr-defined]
    return traced


def update_entry(rule: UpdateRule, e: StepEntry, var: jax.Array, g: jax.Array, idx: jax.Array | None,
                 own_slots: dict[str, jax.Array], t: jax.Array, lr_c: jax.Array, iterations: jax.Array,
                 glob: dict[str, jax.Array] | None = None, kernel: bool = False
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Densifying, weight decay, the definition's update and EMA for one variable (`glob`: the optimizer-level
    state after this step's `update_global`, given to the definition beside the slots, read-only). With `kernel`
    (a variable in buffers of its own) a dense update the definition has a compiled kernel for is a
    `stablehlo.composite` (`_kernel_composite`) that `lower-to-kernels` turns into the kernel's custom call or
    inlines."""
    ct = compute_dtype(e.dtype)
    var_c = var.astype(ct)
    own = [s for s in e.slots if s != EMA_SLOT]
    state = {**{k: v.astype(ct) for k, v in (glob or {}).items()}, **{s: own_slots[s].astype(ct) for s in own}}
    if idx is None:
        g_c = jnp.broadcast_to(g.astype(ct), e.shape)
    else:
        g_c = _densify(g.astype(ct), idx, e.shape)
    composite = _kernel_composite(rule, e, ct) if kernel and idx is None and not glob else None
    if composite is not None:
        new_var, *new_state = composite(var, g_c, lr_c, t, *(own_slots[s] for s in own))
        var_c, out_slots = new_var, dict(zip(own, new_state, strict=True))  # float32 when EMA reads it
    else:
        if rule.weight_decay is not None and e.weight_decay:
            var_c = var_c - (var_c * jnp.asarray(np.float32(rule.weight_decay), ct)) * lr_c
        if idx is None:
            var_c, state = rule.update_dense(var_c, g_c, state, lr_c, t)
        else:
            var_c, state = rule.update_sparse(var_c, g_c, state, lr_c, t)
        out_slots = {s: state[s].astype(e.dtype) for s in own}
    if rule.use_ema:
        avg = own_slots[EMA_SLOT].astype(ct)
        avg = jnp.asarray(rule.ema_momentum, ct) * avg + jnp.asarray(1 - rule.ema_momentum, ct) * var_c
        if rule.ema_overwrite_frequency:
            overwrite = (iterations + 1) % rule.ema_overwrite_frequency == 0
            var_c = jnp.where(overwrite, avg, var_c)
        out_slots[EMA_SLOT] = avg.astype(e.dtype)
    return var_c.astype(e.dtype), out_slots


KERNEL_COMPOSITE_PREFIX = "shardopt."


def _kernel_composite(rule: UpdateRule, e: StepEntry, ct: np.dtype) -> Callable[..., Any] | None:
    """Weight decay, the definition's dense update and the rounding to the variable's dtype as one
    `stablehlo.composite "shardopt.<kernel>"` of (var, grad, lr, t, *slots) -> (var, *slots), its attributes the
    rule's `kernel_spec()` plus `weight_decay` and `operands` (the slot names), its decomposition today's jnp
    math. None when the rule has no kernel for this variable: no `kernel_spec`, float32 math not used, slots of
    another shape, or EMA on a half-precision variable (EMA reads the unrounded float32 variable)."""
    spec_fn = getattr(rule, "kernel_spec", None)
    spec = spec_fn() if spec_fn is not None else None
    if spec is None or ct != np.dtype(np.float32) or (rule.use_ema and np.dtype(e.dtype) != ct):
        return None
    names = [s for s in e.slots if s != EMA_SLOT]
    if any(e.slot_shape(s) != e.shape for s in names):
        return None
    kind, attributes = spec
    wd = rule.weight_decay if e.weight_decay else None  # exclude_from_weight_decay

    def decomposition(var: jax.Array, g_c: jax.Array, lr_c: jax.Array, t: jax.Array, *slot_values: jax.Array,
                      **_: Any) -> tuple[jax.Array, ...]:
        var_c = var.astype(ct)
        state = {s: x.astype(ct) for s, x in zip(names, slot_values, strict=True)}
        if wd is not None:
            var_c = var_c - (var_c * jnp.asarray(np.float32(wd), ct)) * lr_c
        var_c, state = rule.update_dense(var_c, g_c, state, lr_c, t)
        return (var_c.astype(e.dtype), *(state[s].astype(e.dtype) for s in names))

    composite = jax.lax.composite(decomposition, name=KERNEL_COMPOSITE_PREFIX + kind)
    extra = {"has_weight_decay": wd is not None, "weight_decay": float(wd or 0.0), "slots": ",".join(names)}
    return functools.partial(composite, **attributes, **extra)
