"""The Keras API gaps a new user hits (issue 9), each as the user would try it."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shardopt
from shardopt import cli
from shardopt import optimizers as so_optimizers
from shardopt.core.layout import Layout


class Halving(shardopt.schedules.LearningRateSchedule):
    def __init__(self, rate):
        self.rate = rate

    def __call__(self, step):
        return jnp.float32(self.rate) / 2

    def get_config(self):
        return {"rate": self.rate}


def test_from_config_restores_a_custom_schedule_with_custom_objects():
    config = shardopt.SGD(learning_rate=Halving(0.5)).get_config()
    opt = shardopt.SGD.from_config(config, custom_objects={"Halving": Halving})
    assert isinstance(opt._learning_rate, Halving) and opt._learning_rate.rate == 0.5
    with pytest.raises(ValueError, match="Halving"):
        shardopt.SGD.from_config(config)


def test_iterations_is_laid_out_replicated_at_construction_with_mesh(mesh):
    opt = shardopt.Adam(mesh=mesh)
    assert opt.iterations.layout is not None
    assert opt.iterations.layout.to_partition_spec() == jax.sharding.PartitionSpec()


def test_compute_gradients_sums_a_non_scalar_loss():
    v = shardopt.Variable(np.array([1.0, 2.0], np.float32), name="v")
    opt = shardopt.SGD()
    (g, _), = opt.compute_gradients(lambda vals: vals[0] * vals[0], [v])
    np.testing.assert_array_equal(np.asarray(g), [2.0, 4.0])


def test_get_weights_and_set_weights_round_trip(mesh):
    a = shardopt.Variable(np.ones((8, 4), np.float32), name="a", layout=Layout(("batch", "model"), mesh))
    opt = shardopt.Adam(mesh=mesh)
    opt.apply_gradients([(jnp.full((8, 4), 0.5, jnp.float32), a)])
    weights = opt.get_weights()
    assert [w.shape for w in weights] == [(), (8, 4), (8, 4)]
    other = shardopt.Adam(mesh=mesh)
    b = shardopt.Variable(np.ones((8, 4), np.float32), name="a", layout=Layout(("batch", "model"), mesh))
    other.build([b])
    other.set_weights(weights)
    for x, y in zip(other.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="expecting 3 weights"):
        other.set_weights(weights[:2])


def test_optimizers_get_serialize_deserialize():
    opt = shardopt.RMSprop(learning_rate=0.01, momentum=0.5)
    d = so_optimizers.serialize(opt)
    assert d["module"] == "keras.optimizers" and d["class_name"] == "RMSprop" and d["registered_name"] is None
    again = so_optimizers.deserialize(json.loads(json.dumps(d, default=float)))
    assert type(again) is shardopt.RMSprop and again.get_config() == opt.get_config()
    assert isinstance(so_optimizers.get("adamw"), shardopt.AdamW)
    assert so_optimizers.get(opt) is opt
    assert isinstance(so_optimizers.get({"class_name": "SGD", "config": {"momentum": 0.9}}), shardopt.SGD)
    with pytest.raises(ValueError, match="Could not interpret"):
        so_optimizers.get("nope")


def test_cli_maps_a_keras3_adamw_config_to_adamw():
    keras3 = {"name": "adamw", "learning_rate": 0.001, "weight_decay": 0.004, "beta_1": 0.9, "beta_2": 0.999,
              "epsilon": 1e-7, "amsgrad": False, "clipnorm": None, "global_clipnorm": None, "clipvalue": None,
              "use_ema": False, "ema_momentum": 0.99, "ema_overwrite_frequency": None, "loss_scale_factor": None,
              "gradient_accumulation_steps": None}
    name, config = cli.optimizer_config(keras3)
    assert name == "AdamW"
    assert cli.optimizer_class(name) is shardopt.AdamW
    assert cli.optimizer_config({"class_name": "AdamW", "config": {}})[0] == "AdamW"


def test_cli_keeps_tf_keras_variable_names_flat(mesh):
    tree = cli.variable_specs({"dense/kernel:0": [4, 2], "dense/bias:0": [2], "enc/w": [3]}, mesh)
    assert set(tree) == {"dense/kernel:0", "dense/bias:0", "enc"}
    assert set(tree["enc"]) == {"w"}


@pytest.mark.parametrize("cls", ["SGD", "Nadam", "Adagrad", "RMSprop"])
def test_update_step_equals_one_apply_gradients(cls):
    """`update_step` runs the definition's math alone (Nadam's u_product advanced first, as in a step)."""
    v = shardopt.Variable(np.ones(4, np.float32), name="v")
    w = shardopt.Variable(np.ones(4, np.float32), name="w")
    stepped, direct = getattr(shardopt, cls)(), getattr(shardopt, cls)()
    g = jnp.full(4, 0.5, jnp.float32)
    stepped.apply_gradients([(g, v)])
    direct.build([w])
    direct.update_step(g, w)
    np.testing.assert_array_equal(w.numpy(), v.numpy())


@pytest.mark.tf
def test_slot_and_unnamed_variable_names_equal_tf_keras():
    """tf-keras names a slot `Adam/m/a` when `apply_gradients` builds (its name scope) and `m/a` after an
    explicit `build`; an unnamed variable is `Variable`."""
    import tensorflow as tf
    import tf_keras

    tf_vars = [tf.Variable(np.zeros(4, np.float32), name="a"), tf.Variable(np.zeros(2, np.float32))]
    tf_opt = tf_keras.optimizers.Adam(use_ema=True)
    tf_opt.apply_gradients([(tf.ones_like(v), v) for v in tf_vars])
    ours = [shardopt.Variable(np.zeros(4, np.float32), name="a"), shardopt.Variable(np.zeros(2, np.float32))]
    opt = shardopt.Adam(use_ema=True)
    opt.apply_gradients([(jnp.ones_like(v.value), v) for v in ours])
    assert ours[1].name == tf_vars[1].name.split(":")[0] == "Variable"
    assert [v.name for v in opt.variables] == [v.name.split(":")[0] for v in tf_opt.variables]
    built = shardopt.Adam()
    built.build(ours)
    assert [v.name for v in built.variables][1:3] == ["m/a", "v/a"]


@pytest.mark.parametrize("packed", [True, False])
def test_exclude_from_weight_decay_by_variable_and_by_name(mesh, packed):
    """tf-keras's `exclude_from_weight_decay`: excluded variables get the update without the decay."""
    def run(exclude):
        vs = [shardopt.Variable(np.ones(4, np.float32), name=n) for n in ("kernel", "bias", "gamma")]
        opt = shardopt.SGD(learning_rate=0.1, weight_decay=0.5, mesh=mesh)
        if not packed:
            opt.pack_max_elements = 0
        if exclude:
            opt.exclude_from_weight_decay(var_list=[vs[2]], var_names=["bias"])
        opt.apply_gradients([(jnp.zeros(4, jnp.float32), v) for v in vs])
        with pytest.raises(ValueError, match="before the optimizer is built"):
            opt.exclude_from_weight_decay(var_names=["x"])
        return [v.numpy()[0] for v in vs]

    decayed = np.float32(1) - np.float32(1) * np.float32(0.5) * np.float32(0.1)
    assert run(False) == [decayed] * 3
    assert run(True) == [decayed, 1.0, 1.0]
