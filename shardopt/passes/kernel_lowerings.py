"""What each definition's kernel composite lowers to (used by `lower-to-kernels`): the slots the kernel takes, its
`KernelCall` for the composite's attributes, and the runtime scalars computed beside the call.

The composite is `stablehlo.composite "shardopt.<kind>"` (one loose variable) or `"shardopt.<kind>_pack"` (a flat
pack), its attributes the definition's `kernel_spec()` plus `has_weight_decay`, `weight_decay` and `slots`
(frontend/step.py `_kernel_composite`, frontend/pack_kernel.py). The scalars are computed here op for op as the
definition computes them, so the kernel's results are bitwise those of the inlined decomposition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import stablehlo as hlo

from shardopt import kernels
from shardopt.kernels import KernelCall

Attributes = dict[str, Any]


def f32_scalar(x: float) -> ir.Value:
    """A rank-0 float32 constant (at the current insertion point)."""
    t = ir.RankedTensorType.get([], ir.F32Type.get())
    return hlo.ConstantOp(ir.DenseElementsAttr.get(np.asarray(np.float32(x)).reshape(()), type=t)).result


def _weight_decay(a: Attributes) -> float | None:
    return a["weight_decay"] if a["has_weight_decay"] else None


@dataclass(frozen=True)
class KernelLowering:
    """How one definition's composites become its kernels' calls.

    `slots(a)`: the slot names the kernel takes, in order (the composite's `slots` must equal them);
    `call(a, members, clip_scale, step_form)`: the call for one variable (`members` None) or a pack of `members`
    variables; `step_form`: a clip scale applied as XLA:CPU compiles the step (see `adam_call`, `sgd_call`);
    `scalars(a, lr, t)`: the call's runtime scalars by operand name, emitted at the insertion point."""

    slots: Callable[[Attributes], list[str]]
    call: Callable[[Attributes, int | None, bool, bool], KernelCall]
    scalars: Callable[[Attributes, ir.Value, ir.Value], dict[str, ir.Value]]


def _adam_call(a: Attributes, members: int | None, clip_scale: bool, step_form: bool) -> KernelCall:
    options = dict(beta_1=a["beta_1"], beta_2=a["beta_2"], amsgrad=a["amsgrad"], weight_decay=_weight_decay(a),
                   clip_scale=clip_scale, scale_contracted=step_form)
    return kernels.adam_call(**options) if members is None else kernels.adam_pack_call(members, **options)


def _adam_scalars(a: Attributes, lr: ir.Value, t: ir.Value) -> dict[str, ir.Value]:
    """optimizers/adam.py `_alpha_eps` as scalar StableHLO, op for op (float32 betas, as `_via_float32`)."""
    one = f32_scalar(1.0)
    b1_power = hlo.PowOp(f32_scalar(a["beta_1"]), t).result
    b2_power = hlo.PowOp(f32_scalar(a["beta_2"]), t).result
    num = hlo.MulOp(lr, hlo.SqrtOp(hlo.SubtractOp(one, b2_power).result).result).result
    alpha = hlo.DivOp(num, hlo.SubtractOp(one, b1_power).result).result
    return {"alpha": alpha, "eps": f32_scalar(a["epsilon"])}


def _sgd_call(a: Attributes, members: int | None, clip_scale: bool, step_form: bool) -> KernelCall:
    options = dict(momentum=a["momentum"], nesterov=a["nesterov"], weight_decay=_weight_decay(a),
                   clip_scale=clip_scale, scale_float32=step_form)
    return kernels.sgd_call(**options) if members is None else kernels.sgd_pack_call(members, **options)


LOWERINGS: dict[str, KernelLowering] = {
    "adam": KernelLowering(slots=lambda a: ["m", "v", "vhat"] if a["amsgrad"] else ["m", "v"], call=_adam_call,
                           scalars=_adam_scalars),
    # SGD's only runtime scalar is the learning rate, an operand of every call.
    "sgd": KernelLowering(slots=lambda a: ["m"], call=_sgd_call, scalars=lambda a, lr, t: {}),
}
