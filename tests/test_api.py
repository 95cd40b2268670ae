"""The Keras-shaped API (spec §1, §6, §8): config, variables and slots, learning rate and counter, minimize,
update_step, grouped options, layouts kept across steps, one compiled program per gradient signature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import shardopt
from shardopt import Layout
from shardopt import schedules as so_schedules

DEFAULT_CONFIG = [
    ("name", "Adam"), ("weight_decay", None), ("clipnorm", None), ("global_clipnorm", None), ("clipvalue", None),
    ("use_ema", False), ("ema_momentum", 0.99), ("ema_overwrite_frequency", None), ("jit_compile", False),
    ("is_legacy_optimizer", False), ("learning_rate", 0.0010000000474974513), ("beta_1", 0.9), ("beta_2", 0.999),
    ("epsilon", 1e-07), ("amsgrad", False),
]
EXPONENTIAL = {"module": "keras.optimizers.schedules", "class_name": "ExponentialDecay",
               "config": {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.5, "staircase": False,
                          "name": None},
               "registered_name": None}
CONFIGS = {
    "defaults": {},
    "everything": dict(learning_rate=0.05, beta_1=0.8, beta_2=0.95, epsilon=1e-5, amsgrad=True, weight_decay=0.01,
                       clipnorm=1.0, clipvalue=0.5, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=5,
                       name="my_adam"),
    "schedule": dict(learning_rate="exponential", global_clipnorm=2.0),
}


def f32(*shape, fill=1.0):
    return np.full(shape, fill, np.float32)


def first_adam_step(x, g, lr, b1=0.9, b2=0.999, eps=1e-7):
    """One Adam step from zero slots (t = 1), in numpy."""
    g = np.broadcast_to(np.asarray(g, np.float32), x.shape)
    m, v = g * np.float32(1 - b1), np.square(g) * np.float32(1 - b2)
    alpha = np.float32(lr) * np.sqrt(1 - np.float32(b2)) / (1 - np.float32(b1))
    return x - m * alpha / (np.sqrt(v) + np.float32(eps))


def _make(kwargs, module):
    kwargs = dict(kwargs)
    if kwargs.get("learning_rate") == "exponential":
        kwargs["learning_rate"] = module.ExponentialDecay(0.1, 10, 0.5)
    return kwargs


# ----- get_config / from_config -----------------------------------------------------------------------------------
def test_default_get_config_keys_values_and_order():
    config = shardopt.Adam().get_config()
    assert list(config.items()) == DEFAULT_CONFIG
    assert type(config["learning_rate"]) is np.float32
    assert float(config["learning_rate"]) == 0.0010000000474974513


def test_get_config_with_a_schedule_is_the_serialized_dict():
    config = shardopt.Adam(learning_rate=so_schedules.ExponentialDecay(0.1, 10, 0.5)).get_config()
    assert config["learning_rate"] == EXPONENTIAL
    assert list(config) == [k for k, _ in DEFAULT_CONFIG]


def test_callable_learning_rate_serializes_as_its_frozen_float32_value():
    assert shardopt.Adam(learning_rate=lambda: 0.1).get_config()["learning_rate"] == np.float32(0.1)


@pytest.mark.filterwarnings("ignore:`clipvalue` is ignored")
@pytest.mark.parametrize("key", list(CONFIGS))
def test_from_config_round_trip(key):
    opt = shardopt.Adam(**_make(CONFIGS[key], so_schedules))
    config = opt.get_config()
    again = shardopt.Adam.from_config(config)
    assert again.get_config() == config
    assert type(again) is shardopt.Adam


def test_from_config_accepts_the_short_schedule_form():
    config = {**shardopt.Adam().get_config(),
              "learning_rate": {"class_name": "ExponentialDecay", "config": EXPONENTIAL["config"]}}
    opt = shardopt.Adam.from_config(config)
    assert isinstance(opt._learning_rate, so_schedules.ExponentialDecay)
    assert opt.get_config()["learning_rate"] == EXPONENTIAL
    with pytest.raises(ValueError, match="Nope"):
        shardopt.Adam.from_config({**config, "learning_rate": {"class_name": "Nope", "config": {}}})


# ----- variables and slots ----------------------------------------------------------------------------------------
@pytest.fixture
def ab(mesh):
    a = shardopt.Variable(np.arange(32, dtype=np.float32).reshape(4, 8) / 32, name="a",
                          layout=Layout(["batch", "model"], mesh))
    b = shardopt.Variable(f32(6, fill=0.5), name="b")
    return a, b


def test_variables_order_names_and_slots(ab, mesh):
    a, b = ab
    opt = shardopt.Adam(amsgrad=True, use_ema=True, mesh=mesh)
    opt.build([a, b])
    assert [v.name for v in opt.variables] == [
        "iteration", "average/a", "average/b", "m/a", "v/a", "m/b", "v/b", "vhat/a", "vhat/b"]
    for var in (a, b):
        for slot in ("m", "v", "vhat", "average"):
            s = opt.get_slot(var, slot)
            assert s.name == f"{slot}/{var.name}" and s.shape == var.shape and s.dtype == var.dtype
            assert s.layout == var.layout
        np.testing.assert_array_equal(opt.get_slot(var, "average").numpy(), var.numpy())  # EMA starts at the var
        assert not opt.get_slot(var, "m").numpy().any()
    with pytest.raises(KeyError, match="no slot 'momentum'"):
        opt.get_slot(a, "momentum")
    with pytest.raises(KeyError, match="cannot recognize"):
        opt.get_slot(shardopt.Variable(f32(2), name="c"), "m")


def test_layouts_kept_and_program_compiled_once_across_steps(ab, mesh):
    a, b = ab
    opt = shardopt.Adam(amsgrad=True, mesh=mesh)
    for step in range(4):
        opt.apply_gradients([(f32(4, 8, fill=step - 1.5), a), (f32(6, fill=0.25), b)])
        if step == 0:
            (program,) = opt._programs.values()
    assert len(opt._programs) == 1 and next(iter(opt._programs.values())) is program
    assert int(opt.iterations.value) == 4
    assert a.value.sharding.spec == PartitionSpec("batch", "model")
    assert b.value.sharding.is_fully_replicated
    for slot in ("m", "v", "vhat"):
        assert opt.get_slot(a, slot).value.sharding.is_equivalent_to(a.value.sharding, 2)
        assert opt.get_slot(b, slot).value.sharding.is_equivalent_to(b.value.sharding, 1)


# ----- learning rate and counter ----------------------------------------------------------------------------------
def test_learning_rate_settable_without_recompiling(ab, mesh):
    a, b = ab
    opt = shardopt.Adam(learning_rate=0.1, mesh=mesh)
    assert float(opt.learning_rate) == np.float32(0.1) and float(opt.lr) == np.float32(0.1)
    g = [(f32(4, 8, fill=0.5), a), (f32(6, fill=-1.0), b)]
    opt.learning_rate = 0.0                     # alpha == 0: variables stay, slots move
    a0 = a.numpy().copy()
    opt.apply_gradients(g)
    np.testing.assert_array_equal(a.numpy(), a0)
    assert opt.get_slot(a, "m").numpy().any()
    opt.lr = 0.25                               # the alias
    assert float(opt.learning_rate) == 0.25
    m, v = opt.get_slot(b, "m").numpy(), opt.get_slot(b, "v").numpy()
    b0 = b.numpy().copy()
    opt.apply_gradients(g)
    assert len(opt._programs) == 1
    m2, v2 = m + (-1.0 - m) * np.float32(0.1), v + (1.0 - v) * np.float32(1 - 0.999)
    alpha = np.float32(0.25) * np.sqrt(1 - np.float32(0.999) ** 2) / (1 - np.float32(0.9) ** 2)
    np.testing.assert_allclose(b.numpy(), b0 - m2 * alpha / (np.sqrt(v2) + np.float32(1e-7)), rtol=2e-5)


def test_schedule_learning_rate_reports_the_value_of_the_last_step(mesh):
    a = shardopt.Variable(f32(4), name="a")
    opt = shardopt.Adam(learning_rate=so_schedules.PiecewiseConstantDecay([1], [0.5, 0.1]), mesh=mesh)
    assert float(opt.learning_rate) == 0.5
    opt.apply_gradients([])                      # an empty call: no step, no build, no counter increment
    assert int(opt.iterations.value) == 0 and not opt._built
    for expected in (0.5, 0.5, 0.1):             # schedule(0), schedule(1), schedule(2)
        opt.apply_gradients([(f32(4), a)])
        assert float(opt.learning_rate) == np.float32(expected)


def test_iterations_settable_before_build(mesh):
    a = shardopt.Variable(f32(4), name="a")
    opt = shardopt.Adam(learning_rate=0.1, mesh=mesh)
    opt.iterations = 5
    assert int(opt.iterations.value) == 5
    opt.apply_gradients([(f32(4, fill=0.5), a)])
    assert int(opt.iterations.value) == 6
    assert opt.variables[0] is opt.iterations
    # bias correction used t = 6: alpha = lr * sqrt(1 - b2^6) / (1 - b1^6), m = 0.05, v = 0.00025
    alpha = np.float32(0.1) * np.sqrt(1 - np.float32(0.999) ** 6) / (1 - np.float32(0.9) ** 6)
    expected = 1 - np.float32(0.05) * alpha / (np.sqrt(np.float32(0.00025)) + np.float32(1e-7))
    np.testing.assert_allclose(a.numpy(), np.full(4, expected), rtol=2e-5)


# ----- minimize, compute_gradients, update_step --------------------------------------------------------------------
def test_compute_gradients_and_minimize(ab, mesh):
    a, b = ab
    loss = lambda values: jnp.sum(values[0] ** 2) + jnp.sum(values[1] * 3.0)
    opt = shardopt.Adam(learning_rate=0.1, mesh=mesh)
    grads = opt.compute_gradients(loss, [a, b])
    assert [v for _, v in grads] == [a, b]
    np.testing.assert_allclose(np.asarray(grads[0][0]), 2 * a.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grads[1][0]), f32(6, fill=3.0))
    a0, b0 = a.numpy().copy(), b.numpy().copy()
    assert opt.minimize(loss, [a, b]) is opt.iterations
    assert int(opt.iterations.value) == 1
    np.testing.assert_allclose(a.numpy(), first_adam_step(a0, 2 * a0, 0.1), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(b.numpy(), first_adam_step(b0, 3.0, 0.1), rtol=2e-5)
    with pytest.raises(TypeError, match="callable"):
        opt.compute_gradients(1.0, [a])


def test_update_step_applies_the_definition_only(ab, mesh):
    a, b = ab
    opt = shardopt.Adam(learning_rate=0.1, clipvalue=0.01, use_ema=True, mesh=mesh)
    opt.build([a, b])
    b0 = b.numpy().copy()
    opt.update_step(f32(6, fill=2.0), b)   # no clipping, no EMA, no counter increment
    assert int(opt.iterations.value) == 0
    np.testing.assert_allclose(b.numpy(), first_adam_step(b0, 2.0, 0.1), rtol=2e-5)
    np.testing.assert_allclose(opt.get_slot(b, "m").numpy(), f32(6, fill=0.2), rtol=1e-6)
    np.testing.assert_array_equal(opt.get_slot(b, "average").numpy(), b0)
    assert b.value.sharding.is_fully_replicated


def test_broadcastable_gradients_are_accepted(ab, mesh):
    a, b = ab
    opt = shardopt.Adam(learning_rate=0.1, mesh=mesh)
    row = np.linspace(-1, 1, 8, dtype=np.float32)
    a0, b0 = a.numpy().copy(), b.numpy().copy()
    opt.apply_gradients([(row, a), (np.float32(0.5), b)])   # (8,) -> (4, 8) and a scalar -> (6,)
    np.testing.assert_allclose(a.numpy(), first_adam_step(a0, row, 0.1), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(b.numpy(), first_adam_step(b0, 0.5, 0.1), rtol=2e-5)
    assert a.value.sharding.spec == PartitionSpec("batch", "model")


# ----- grouped options --------------------------------------------------------------------------------------------
def test_grouped_options_are_accepted():
    opt = shardopt.Adam(gradients_clip_option=shardopt.GradientsClipOption(global_clipnorm=2.0, clipvalue=None),
                        ema_option=shardopt.EMAOption(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3))
    config = opt.get_config()
    assert (config["global_clipnorm"], config["clipnorm"], config["clipvalue"]) == (2.0, None, None)
    assert (config["use_ema"], config["ema_momentum"], config["ema_overwrite_frequency"]) == (True, 0.9, 3)
    # the grouped options go through the same checks as the keywords
    with pytest.raises(ValueError, match="At most one"):
        shardopt.Adam(gradients_clip_option=shardopt.GradientsClipOption(clipnorm=1.0, global_clipnorm=1.0))
    with pytest.raises(ValueError, match="ema_momentum"):
        shardopt.Adam(ema_option=shardopt.EMAOption(use_ema=True, ema_momentum=3.0))
    with pytest.raises(ValueError, match="clipnorm"):
        shardopt.Adam(clipnorm=1.0, gradients_clip_option=shardopt.GradientsClipOption(clipnorm=2.0))


def test_mesh_must_be_a_jax_mesh():
    with pytest.raises(TypeError, match="mesh"):
        shardopt.Adam(mesh="2x4")


# ----- against tf-keras -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tfk():
    """TensorFlow and tf_keras, imported once per module (slow)."""
    import tensorflow as tf
    import tf_keras

    return tf, tf_keras


@pytest.mark.tf
@pytest.mark.filterwarnings("ignore:`clipvalue` is ignored")
@pytest.mark.parametrize("key", list(CONFIGS))
def test_get_config_equals_tf_keras(key, tfk):
    tf, tf_keras = tfk
    ours = shardopt.Adam(**_make(CONFIGS[key], so_schedules)).get_config()
    theirs = tf_keras.optimizers.Adam(**_make(CONFIGS[key], tf_keras.optimizers.schedules)).get_config()
    assert list(ours) == list(theirs)
    assert ours == theirs
    assert type(ours["learning_rate"]) is type(theirs["learning_rate"])


@pytest.mark.tf
def test_variable_names_equal_tf_keras(tfk):
    tf, tf_keras = tfk
    opt = tf_keras.optimizers.Adam(amsgrad=True, use_ema=True)
    opt.build([tf.Variable(np.zeros((4, 8), np.float32), name="a"), tf.Variable(np.zeros(6, np.float32), name="b")])
    ours = shardopt.Adam(amsgrad=True, use_ema=True, mesh=jax.make_mesh((2, 4), ("batch", "model")))
    ours.build([shardopt.Variable(np.zeros((4, 8), np.float32), name="a"), shardopt.Variable(f32(6), name="b")])
    assert [v.name for v in ours.variables] == [v.name.split(":")[0] for v in opt.variables]
