"""Builds the pure, flat step function that the frontend lowers: one call = one `apply_gradients`.

`@main(vars, grads, slots, iterations, learning_rate) -> (vars, slots, iterations, current_lr)`, with tf-keras's
order of work: schedule at the pre-increment counter, clip raw gradients, de-duplicate sparse rows, weight
decay, the definition's update per variable, EMA (and its overwrite), counter increment.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from shardopt.frontend import clipping
from shardopt.frontend.convention import (
    COUNTER,
    GRADIENT,
    GRADIENT_BUFFER,
    GRADIENT_INDICES,
    HYPERPARAMETER,
    SLOT,
    VARIABLE,
    CallingConvention,
    TensorSpec,
)
from shardopt.frontend.packing import PackGroup

if TYPE_CHECKING:
    from shardopt.frontend.optimizer import Optimizer

EMA_SLOT = "average"


@dataclass(frozen=True)
class StepEntry:
    """One variable that receives a gradient in this step, and how that gradient arrives."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    layout: tuple[Any, ...]          # PartitionSpec-like tuple of the variable
    slots: tuple[str, ...]           # slot names in the optimizer's order (EMA average last)
    sparse_rows: int | None = None   # number of IndexedSlices rows, None for a dense gradient
    grad_shape: tuple[int, ...] | None = None  # dense gradients may broadcast to the variable's shape
    index_dtype: str = "int32"


def compute_dtype(dtype: Any) -> np.dtype:
    """Half-precision variables are updated in float32 and rounded once (shardopt's decision, spec top)."""
    dt = np.dtype(dtype)
    return np.dtype(np.float32) if dt.itemsize < 4 else dt


def counter_dtype() -> np.dtype:
    """int64 when jax has x64 enabled (as tf-keras), else int32 (as Keras 3 on JAX)."""
    return np.dtype(np.int64) if jax.config.jax_enable_x64 else np.dtype(np.int32)


def _loose(entries: list[StepEntry], packs: tuple[PackGroup, ...]) -> list[StepEntry]:
    packed = {m.name for p in packs for m in p.members}
    return [e for e in entries if e.name not in packed]


def build_convention(entries: list[StepEntry], mesh_axes: tuple[tuple[str, int], ...], has_lr_input: bool,
                     packs: tuple[PackGroup, ...] = (), pack_slots: tuple[str, ...] = ()) -> CallingConvention:
    """The argument and result list of the step; slots are left with open layouts for propagate-layouts.

    Variables of `packs` (and each of their slots) arrive as one buffer per pack, before the loose variables;
    every entry still has its own gradient."""
    args: list[TensorSpec] = []
    loose = _loose(entries, packs)
    for p in packs:
        args.append(TensorSpec(p.name, VARIABLE, p.shape, p.dtype, layout=p.layout, donated=True))
    for e in loose:
        args.append(TensorSpec(e.name, VARIABLE, e.shape, e.dtype, layout=e.layout, donated=True))
    for e in entries:
        gname = f"grad/{e.name}"
        if e.sparse_rows is None:
            gshape = e.grad_shape if e.grad_shape is not None else e.shape
            glayout = e.layout if gshape == e.shape else None
            args.append(TensorSpec(gname, GRADIENT, gshape, e.dtype, owner=e.name, layout=glayout))
        else:
            args.append(TensorSpec(gname, GRADIENT, (e.sparse_rows, *e.shape[1:]), e.dtype, owner=e.name))
            args.append(TensorSpec(f"grad_indices/{e.name}", GRADIENT_INDICES, (e.sparse_rows,), e.index_dtype,
                                   owner=e.name))
    for p in packs:
        for s in pack_slots:
            args.append(TensorSpec(f"{s}/{p.name}", SLOT, p.shape, p.dtype, owner=p.name, donated=True))
    for e in loose:
        for s in e.slots:
            args.append(TensorSpec(f"{s}/{e.name}", SLOT, e.shape, e.dtype, owner=e.name, donated=True))
    for p in packs:
        args.append(TensorSpec(f"gradient_buffer/{p.name}", GRADIENT_BUFFER, p.shape, p.dtype, owner=p.name,
                               donated=True))
    ctr = str(counter_dtype())
    args.append(TensorSpec("iterations", COUNTER, (), ctr, layout=(), donated=True))
    if has_lr_input:
        args.append(TensorSpec("learning_rate", HYPERPARAMETER, (), "float32", layout=()))
    results = [a for a in args if a.role in (VARIABLE, SLOT, GRADIENT_BUFFER, COUNTER)]
    results.append(TensorSpec("learning_rate", HYPERPARAMETER, (), "float32", layout=()))
    return CallingConvention(tuple(args), tuple(results), mesh_axes)


def _densify(values: jax.Array, indices: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """De-duplicated sparse rows as a dense tensor: duplicate rows are summed (tf's unsorted_segment_sum)."""
    return jnp.zeros(shape, values.dtype).at[indices].add(values, mode="drop")


def make_step_fn(opt: Optimizer, entries: list[StepEntry], schedule: Any | None,
                 packs: tuple[PackGroup, ...] = (), pack_slots: tuple[str, ...] = ()
                 ) -> Callable[..., tuple[jax.Array, ...]]:
    """The flat step for `entries` under `opt`'s configuration (everything but lr is a compile-time constant).

    Members of `packs` are cut out of their packed buffers, updated like any variable, and packed again (members
    without a gradient pass through unchanged); `fuse-moments` turns that into one update per pack."""
    loose = _loose(entries, packs)
    ngrad_args = sum(1 if e.sparse_rows is None else 2 for e in entries)
    nvars = len(packs) + len(loose)
    nslots = len(packs) * len(pack_slots) + sum(len(e.slots) for e in loose)
    nstate = nvars + ngrad_args + nslots + len(packs)  # the gradient buffers follow the slots

    def step(*flat: jax.Array) -> tuple[jax.Array, ...]:
        var_args = list(flat[:nvars])
        grad_args = list(flat[nvars:nvars + ngrad_args])
        slot_args = list(flat[nvars + ngrad_args:nvars + ngrad_args + nslots])
        iterations = flat[nstate]
        lr = schedule(iterations) if schedule is not None else flat[nstate + 1]
        lr = jnp.asarray(lr, jnp.float32)

        variables: dict[str, jax.Array] = {}
        slots: dict[str, dict[str, jax.Array]] = {}
        for p, packed in zip(packs, var_args, strict=False):
            for i, m in enumerate(p.members):
                variables[m.name] = p.unpack(packed, i)
        k = len(packs) * len(pack_slots)
        for pi, p in enumerate(packs):
            for i, m in enumerate(p.members):
                slots[m.name] = {s: p.unpack(slot_args[pi * len(pack_slots) + si], i)
                                 for si, s in enumerate(pack_slots)}
        for e, var in zip(loose, var_args[len(packs):], strict=True):
            variables[e.name] = var
            slots[e.name] = dict(zip(e.slots, slot_args[k:k + len(e.slots)], strict=True))
            k += len(e.slots)

        new_vars, new_slots = _update_entries(opt, entries, variables, grad_args, slots, iterations, lr)
        variables.update(new_vars)
        slots.update(new_slots)
        out_vars = [p.pack([variables[m.name] for m in p.members]) for p in packs]
        out_vars += [variables[e.name] for e in loose]
        out_slots = [p.pack([slots[m.name][s] for m in p.members]) for p in packs for s in pack_slots]
        out_slots += [slots[e.name][s] for e in loose for s in e.slots]
        out_buffers = [_gathered_gradients(p, entries, grad_args) for p in packs]
        return (*out_vars, *out_slots, *out_buffers, iterations + 1, lr)

    return step


def _gradient_args(entries: list[StepEntry], grad_args: list[jax.Array]
                   ) -> list[tuple[jax.Array, jax.Array | None]]:
    """Each entry's gradient argument and, for a sparse gradient, its row indices (None for a dense one)."""
    out, k = [], 0
    for e in entries:
        out.append((grad_args[k], None if e.sparse_rows is None else grad_args[k + 1]))
        k += 1 if e.sparse_rows is None else 2
    return out


def _gathered_gradients(pack: PackGroup, entries: list[StepEntry], grad_args: list[jax.Array]) -> jax.Array:
    """The pack's gradients concatenated as `fuse-moments` concatenates them for its chain (so `cleanup`'s CSE
    makes them one value, which XLA then writes into the donated gradient buffer instead of a temporary). Members
    without a dense gradient of their own shape and dtype contribute zeros: the buffer is scratch, never read."""
    dense = {e.name: g for e, (g, idx) in zip(entries, _gradient_args(entries, grad_args), strict=True)
             if idx is None and e.grad_shape is None}
    pieces = []
    for m in pack.members:
        g = dense.get(m.name)
        pieces.append(g if g is not None and g.dtype == np.dtype(pack.dtype)
                      else jnp.zeros(m.shape, np.dtype(pack.dtype)))
    return pack.pack(pieces)


def _update_entries(opt: Optimizer, entries: list[StepEntry], variables: dict[str, jax.Array],
                    grad_args: list[jax.Array], slots: dict[str, dict[str, jax.Array]], iterations: jax.Array,
                    lr: jax.Array) -> tuple[dict[str, jax.Array], dict[str, dict[str, jax.Array]]]:
    """Clipping, densifying, weight decay, the definition's update and EMA for every entry (by name)."""
    args = _gradient_args(entries, grad_args)
    # Half-precision gradients are clipped in float32 too: a float16 sum of squares overflows at a norm of 256,
    # which would turn every gradient into NaN (global) or zero (per tensor).
    raw = [g.astype(compute_dtype(e.dtype)) for e, (g, _) in zip(entries, args, strict=True)]
    clipped = clipping.clip_gradients(raw, opt.clipnorm, opt.global_clipnorm, opt.clipvalue)

    new_vars: dict[str, jax.Array] = {}
    new_slots: dict[str, dict[str, jax.Array]] = {}
    per_dtype: dict[np.dtype, tuple[jax.Array, jax.Array]] = {}  # (t, lr) once per compute dtype, not per variable
    update = _traced_once(opt)
    for e, g, (_, idx) in zip(entries, clipped, args, strict=True):
        ct = compute_dtype(e.dtype)
        if ct not in per_dtype:
            per_dtype[ct] = ((iterations + 1).astype(ct), lr.astype(ct))
        new_vars[e.name], new_slots[e.name] = update(dataclasses.replace(e, name=""), variables[e.name], g, idx,
                                                     slots[e.name], *per_dtype[ct], iterations)
    return new_vars, new_slots


def _traced_once(opt: Optimizer) -> Callable[..., Any]:
    """`_update_entry` under `jax.jit`, keyed by the entry without its name: jax traces the update once per
    distinct (shape, dtype, layout, gradient kind) instead of once per variable, and lowers each call to a
    `func.call` of one shared function that `inline-calls` inlines (2000 same-shaped variables: one trace)."""
    if opt._traced_update is None:
        opt._traced_update = jax.jit(functools.partial(_update_entry, opt), static_argnums=(0,))
    return opt._traced_update


def _update_entry(opt: Optimizer, e: StepEntry, var: jax.Array, g: jax.Array, idx: jax.Array | None,
                  own_slots: dict[str, jax.Array], t: jax.Array, lr_c: jax.Array, iterations: jax.Array
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Densifying, weight decay, the definition's update and EMA for one variable."""
    ct = compute_dtype(e.dtype)
    var_c = var.astype(ct)
    state = {s: own_slots[s].astype(ct) for s in e.slots if s != EMA_SLOT}
    if idx is None:
        g_c = jnp.broadcast_to(g.astype(ct), e.shape)
    else:
        g_c = _densify(g.astype(ct), idx, e.shape)
    if opt.weight_decay is not None:
        var_c = var_c - (var_c * jnp.asarray(np.float32(opt.weight_decay), ct)) * lr_c
    if idx is None:
        var_c, state = opt.update_dense(var_c, g_c, state, lr_c, t)
    else:
        var_c, state = opt.update_sparse(var_c, g_c, state, lr_c, t)
    out_slots = {s: v.astype(e.dtype) for s, v in state.items()}
    if opt.use_ema:
        avg = own_slots[EMA_SLOT].astype(ct)
        avg = jnp.asarray(opt.ema_momentum, ct) * avg + jnp.asarray(1 - opt.ema_momentum, ct) * var_c
        if opt.ema_overwrite_frequency:
            overwrite = (iterations + 1) % opt.ema_overwrite_frequency == 0
            var_c = jnp.where(overwrite, avg, var_c)
        out_slots[EMA_SLOT] = avg.astype(e.dtype)
    return var_c.astype(e.dtype), out_slots
