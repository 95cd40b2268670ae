"""Checkpoints of a Keras-shaped optimizer's state: `opt.state_dict()` / `opt.load_state_dict(d)`.

The state dict is flat and named as tf-keras names the optimizer's variables: `<slot>/<variable name>` for each
slot (`m/dense/kernel`, `v/...`, `vhat/...`, `average/...` with EMA) and `iteration` for the counter; each
value is a jax.Array laid out as its variable. Packing stays the optimizer's business: a packed slot is cut out
of its buffer when saved and written back into it when loaded, so a checkpoint restores into any optimizer over
the same variables (packed or not, any `pack_max_elements`). Any pytree checkpointer (orbax) saves the dict as
it is; `state_dict_specs` is the matching restore target. The learning rate is configuration, not state
(`get_config`): it is not in the dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shardopt.optimizers.variables import Variable
from shardopt.runtime.functional import CHECKPOINT_COUNTER, check_state_dict


def _named_state(opt: Any) -> dict[str, Variable]:
    """Name -> the Variable holding it (slots are views of packed buffers where packed)."""
    if not opt._built:
        raise RuntimeError(f"optimizer {opt.name!r} is not built: it has no state yet. Call "
                           "`opt.build(variables)` (or pass `var_list=` to `load_state_dict`) first")
    out: dict[str, Variable] = {CHECKPOINT_COUNTER: opt.iterations}
    slot_vars = set()
    for name, own in zip(opt._step_names, opt._slots, strict=True):
        for slot, var in own.items():
            out[f"{slot}/{name}"] = var
            slot_vars.add(id(var))
    for var in opt._variables:  # optimizer variables that are not slots (`add_variable`)
        if id(var) not in slot_vars:
            out[var.name] = var
    out.update(opt._optimizer_state)  # optimizer-level state (Nadam's u_product, skipped steps, optax's leaves)
    return out


def state_dict(opt: Any) -> dict[str, jax.Array]:
    """The optimizer's state as `{name: jax.Array}` (copies: the next step, which donates the state, does not
    delete them)."""
    return {name: jnp.array(var.value, copy=True) for name, var in _named_state(opt).items()}


def state_dict_specs(opt: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes, dtypes and shardings of `state_dict(opt)` without reading any value (a restore target)."""
    return {name: jax.ShapeDtypeStruct(var.shape, np.dtype(var.dtype), sharding=var.sharding)
            for name, var in _named_state(opt).items()}


def load_state_dict(opt: Any, values: dict[str, Any], var_list: Sequence[Variable] | None = None) -> None:
    """Restores `state_dict(opt)`'s values into `opt`, laid out on its layouts, after checking names, shapes and
    dtypes (nothing is written unless everything matches). An optimizer not built yet is built from
    `var_list` first (the model's variables, in the order of the training run that saved the state)."""
    if not opt._built:
        if var_list is None:
            raise RuntimeError(f"optimizer {opt.name!r} is not built, so it does not know its variables: call "
                               "`opt.build(variables)` first or pass them as `load_state_dict(d, var_list=...)`")
        opt.build(list(var_list))
    with opt._lock:
        holders = _named_state(opt)
        checked = check_state_dict({n: v for n, v in holders.items()}, values)
        for name, var in holders.items():
            var.assign(checked[name])  # placed on the variable's layout; a packed slot is written into its pack
        if hasattr(opt, "_current_lr"):
            opt._current_lr = None  # a schedule's learning rate depends on the restored counter


__all__ = ["load_state_dict", "state_dict", "state_dict_specs"]
