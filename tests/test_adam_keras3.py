"""Adam trajectories against Keras 3 (`keras.optimizers.Adam`, JAX backend) for every option Keras 3 shares with
tf-keras (spec §11: the Adam math, clipping alone, schedules and weight decay agree).

shardopt runs on the 2x4 mesh with sharded and replicated variables of several shapes; Keras 3 runs eagerly on
one device. Variables, every slot and the counter are compared after every step.
"""

import jax
import keras
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import shardopt
from shardopt import UNSHARDED, Layout
from shardopt import schedules as so_schedules

STEPS = 12
RTOL, ATOL = 2e-5, 1e-6
# m is a running mean of +-1 gradients and can cancel to ~1e-3: allow a few float32 ulps of its scale (XLA fuses
# `m + (g - m) * c` into an FMA where Keras rounds twice). v and vhat are sums of squares: no cancellation.
SLOT_ATOL = {"m": 1e-7, "v": 1e-9, "vhat": 1e-9}

# (name, shape, layout spec on the 2x4 ('batch', 'model') mesh; None = replicated)
VARIABLES = [
    ("dense/kernel", (6, 8), [UNSHARDED, "model"]),
    ("conv/kernel", (4, 12), ["batch", "model"]),
    ("dense/bias", (8,), None),
    ("scale", (3, 5), None),
]

SCHEDULES = {
    "exponential": ("ExponentialDecay", dict(initial_learning_rate=0.02, decay_steps=4, decay_rate=0.5)),
    "exponential_staircase": ("ExponentialDecay", dict(initial_learning_rate=0.02, decay_steps=3, decay_rate=0.7,
                                                        staircase=True)),
    "piecewise": ("PiecewiseConstantDecay", dict(boundaries=[3, 7], values=[0.02, 0.01, 0.002])),
    "polynomial": ("PolynomialDecay", dict(initial_learning_rate=0.02, decay_steps=8, end_learning_rate=0.001,
                                           power=0.5)),
    "polynomial_cycle": ("PolynomialDecay", dict(initial_learning_rate=0.02, decay_steps=5, cycle=True)),
    "inverse_time": ("InverseTimeDecay", dict(initial_learning_rate=0.02, decay_steps=3, decay_rate=0.5,
                                              staircase=True)),
    "cosine": ("CosineDecay", dict(initial_learning_rate=0.02, decay_steps=9, alpha=0.1)),
    "cosine_warmup": ("CosineDecay", dict(initial_learning_rate=0.001, decay_steps=6, warmup_target=0.02,
                                          warmup_steps=4)),
    "cosine_restarts": ("CosineDecayRestarts", dict(initial_learning_rate=0.02, first_decay_steps=3, t_mul=2.0,
                                                    m_mul=0.8, alpha=0.05)),
}

CONFIGS = {
    "defaults": {},
    "betas_epsilon": dict(beta_1=0.8, beta_2=0.95, epsilon=1e-4, learning_rate=0.01),
    "amsgrad": dict(amsgrad=True, learning_rate=0.01),
    "clipnorm": dict(clipnorm=0.5, learning_rate=0.01),
    "clipvalue": dict(clipvalue=0.3, learning_rate=0.01),
    "global_clipnorm": dict(global_clipnorm=1.0, learning_rate=0.01),
    "float_lr": dict(learning_rate=0.05),
    "weight_decay": dict(weight_decay=0.1, learning_rate=0.05),
    **{f"schedule_{k}": {"schedule": k} for k in SCHEDULES},
}


class Jitted(keras.optimizers.schedules.LearningRateSchedule):
    """A Keras 3 schedule evaluated under `jax.jit`: its formula, compiled once. (Eagerly, CosineDecayRestarts
    re-traces an `ops.cond` on every call, ~0.4 s a step.)"""

    def __init__(self, schedule):
        self._fn = jax.jit(schedule.__call__)

    def __call__(self, step):
        return self._fn(keras.ops.convert_to_tensor(step))


def make_pair(config):
    """The same Adam in shardopt and in Keras 3."""
    so_kwargs, k_kwargs = dict(config), dict(config)
    if "schedule" in config:
        cls_name, args = SCHEDULES[config["schedule"]]
        so_kwargs["learning_rate"] = getattr(so_schedules, cls_name)(**args)
        k_kwargs["learning_rate"] = Jitted(getattr(keras.optimizers.schedules, cls_name)(**args))
        del so_kwargs["schedule"], k_kwargs["schedule"]
    return so_kwargs, keras.optimizers.Adam(**k_kwargs)


def test_weight_decay_formula_matches_tf_keras():
    """Keras 3 decays as tf-keras does (`var -= var * wd * lr` before the step), so it is a valid reference."""
    var = keras.Variable(np.array([2.0, -4.0, 0.3], np.float32))
    opt = keras.optimizers.Adam(learning_rate=0.5, weight_decay=0.1)
    opt.build([var])
    opt.apply_gradients([(np.zeros(3, np.float32), var)])  # zero grad, so m = 0: only the decay moves the variable
    expected = np.array([2.0, -4.0, 0.3], np.float32)
    expected = expected - (expected * np.float32(0.1)) * np.float32(0.5)
    np.testing.assert_array_equal(np.asarray(var.value), expected)


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_trajectory_matches_keras3(config, mesh):
    rng = np.random.default_rng(sum(map(ord, str(config))))
    inits = [rng.standard_normal(shape).astype(np.float32) for _, shape, _ in VARIABLES]
    so_vars = [
        shardopt.Variable(init, name=name, layout=None if spec is None else Layout(spec, mesh))
        for (name, _, spec), init in zip(VARIABLES, inits, strict=True)
    ]
    k_vars = [keras.Variable(init, name=name.replace("/", "_")) for (name, _, _), init in zip(VARIABLES, inits,
                                                                                              strict=True)]
    so_kwargs, k_opt = make_pair(config)
    opt = shardopt.Adam(mesh=mesh, **so_kwargs)
    k_opt.build(k_vars)
    slot_lists = {"m": k_opt._momentums, "v": k_opt._velocities}
    if config.get("amsgrad"):
        slot_lists["vhat"] = k_opt._velocity_hats

    for step in range(1, STEPS + 1):
        grads = [rng.standard_normal(shape).astype(np.float32) for _, shape, _ in VARIABLES]
        opt.apply_gradients(zip(grads, so_vars, strict=True))
        k_opt.apply_gradients(zip(grads, k_vars, strict=True))
        assert int(opt.iterations.value) == int(k_opt.iterations.value) == step
        for i, (sv, kv) in enumerate(zip(so_vars, k_vars, strict=True)):
            np.testing.assert_allclose(sv.numpy(), np.asarray(kv.value), rtol=RTOL, atol=ATOL,
                                       err_msg=f"{sv.name} at step {step}")
            for slot, k_list in slot_lists.items():
                np.testing.assert_allclose(opt.get_slot(sv, slot).numpy(), np.asarray(k_list[i].value), rtol=RTOL,
                                           atol=SLOT_ATOL[slot], err_msg=f"{slot}/{sv.name} at step {step}")
    # The sharded variables kept their layouts through the steps, and one program served all of them.
    assert so_vars[0].value.sharding.spec == PartitionSpec(None, "model")
    assert so_vars[1].value.sharding.spec == PartitionSpec("batch", "model")
    assert len(opt._programs) == 1
    # The variables moved: the comparison above is not between two untouched copies.
    assert all(np.abs(sv.numpy() - init).max() > 1e-3 for sv, init in zip(so_vars, inits, strict=True))
