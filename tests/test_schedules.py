"""Learning-rate schedules against Keras 3 (JAX backend) and tf-keras 2.21: values, jit, serialization, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shardopt.frontend import schedules as S

# (class name, args, kwargs): every schedule, with staircase, cycle, warmup, t_mul == 1 and != 1, float boundaries.
CASES = [
    ("ExponentialDecay", (0.1, 7, 0.9), {}),
    ("ExponentialDecay", (0.1, 7, 0.9), {"staircase": True}),
    ("ExponentialDecay", (1.0, 3.5, 0.5), {"name": "exp"}),
    ("PiecewiseConstantDecay", ([10, 20, 40], [1.0, 0.5, 0.1, 0.01]), {}),
    ("PiecewiseConstantDecay", ([-0.5, 2.5, 5.9, 30.0], [0.3, 1.0, 0.5, 0.25, 0.125]), {}),
    ("PolynomialDecay", (0.1, 13), {}),
    ("PolynomialDecay", (0.1, 13, 0.001, 0.5), {}),
    ("PolynomialDecay", (0.1, 13, 0.001, 0.5, True), {}),
    ("PolynomialDecay", (1.0, 10, 0.0, 2.0, True), {}),
    ("InverseTimeDecay", (0.1, 7, 0.5), {}),
    ("InverseTimeDecay", (0.1, 7, 0.5, True), {}),
    ("CosineDecay", (0.1, 20), {}),
    ("CosineDecay", (0.1, 20), {"alpha": 0.1}),
    ("CosineDecay", (0.0, 20), {"alpha": 0.1, "warmup_target": 0.2, "warmup_steps": 10}),
    ("CosineDecay", (0.01, 30), {"warmup_target": 0.1, "warmup_steps": 7}),
    ("CosineDecayRestarts", (0.1, 5), {}),
    ("CosineDecayRestarts", (0.1, 5, 1.0, 0.5, 0.1), {}),
    ("CosineDecayRestarts", (0.1, 3, 1.5, 0.9, 0.05), {}),
    ("CosineDecayRestarts", (0.1, 4, 3.0), {}),
    ("CosineDecayRestarts", (0.1, 1), {}),
]
IDS = [f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)]
STEPS = [*range(61), 100, 1000, 12345, 10**6, 2**31 - 1]


def _scale(args, kwargs) -> float:
    """The schedule's largest learning rate: absolute tolerances are relative to it."""
    if isinstance(args[0], list):
        return max(abs(v) for v in args[1])
    return max(abs(args[0]), abs(kwargs.get("warmup_target") or 0.0))


def _close(ours, ref, args, kwargs) -> None:
    """Equal to a few float32 ulps; near-zero rates (1 + cos(pi) cancels) get an absolute allowance."""
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7 * _scale(args, kwargs))


@pytest.fixture(scope="module")
def keras_schedules():
    import keras

    assert keras.backend.backend() == "jax"
    return keras.optimizers.schedules


@pytest.fixture(scope="module")
def tf_schedules():
    import tensorflow as tf
    import tf_keras

    return tf, tf_keras.optimizers.schedules


@pytest.fixture(scope="module", params=range(len(CASES)), ids=IDS)
def case(request, keras_schedules):
    """One case with our values at STEPS, eager (Python int steps) and jitted (traced int32), and Keras 3's."""
    cls, args, kwargs = CASES[request.param]
    ours = getattr(S, cls)(*args, **kwargs)
    ref = getattr(keras_schedules, cls)(*args, **kwargs)
    jitted = jax.jit(ours)
    eager = np.array([ours(s) for s in STEPS])
    traced = np.array([jitted(jnp.int32(s)) for s in STEPS])
    # Keras 3 runs its ops.cond (warmup, restarts) as a compiled lax.cond, which recompiles on every eager call
    # and may move the last bit; with jit disabled it runs op by op, like tf-keras.
    with jax.disable_jit():
        keras3 = np.array([ref(jnp.int32(s)) for s in STEPS])
    return cls, args, kwargs, ours, eager, traced, keras3


def test_eager_matches_keras3(case):
    _, _, _, ours, eager, _, keras3 = case
    assert ours(3).dtype == jnp.float32 and ours(3).shape == ()
    np.testing.assert_array_equal(eager, keras3)


def test_jit_matches_keras3(case):
    _, args, kwargs, _, _, traced, keras3 = case
    _close(traced, keras3, args, kwargs)


def test_vmap_matches_scalar_calls(case):
    _, args, kwargs, ours, _, traced, _ = case
    # Not the last step: float32(2**31 - 1) is a restart point of CosineDecayRestarts(0.1, 1), where the
    # last bit of log(2**31) / log(2) decides the period, and vectorized code may round it differently.
    steps = jnp.asarray(STEPS[:-1], jnp.int32)
    _close(jax.jit(jax.vmap(ours))(steps), traced[:-1], args, kwargs)


@pytest.mark.tf
def test_values_match_tf_keras(tf_schedules, case):
    tf, T = tf_schedules
    cls, args, kwargs, _, eager, traced, _ = case
    ref = getattr(T, cls)(*args, **kwargs)
    expected = np.array([ref(tf.constant(s, tf.int64)).numpy() for s in STEPS], np.float32)
    np.testing.assert_array_equal(eager, expected)  # bit for bit
    _close(traced, expected, args, kwargs)


def test_jit_divides_exactly_at_the_end_of_polynomial_decay():
    # XLA would rewrite s / 13 as s * (1/13); then 1 - 13/13 < 0 and (1 - p) ** 0.5 is NaN (Keras 3 under jit).
    for ds in (3, 7, 13, 99):
        sched = jax.jit(S.PolynomialDecay(0.1, ds, power=0.5))
        for step in (ds, ds + 1, 10 * ds):
            assert sched(jnp.int32(step)) == np.float32(1e-4)


def test_step_types_agree():
    sched = S.ExponentialDecay(0.1, 3, 0.5)
    expected = sched(7)
    for step in (np.int64(7), np.int32(7), jnp.int32(7), np.array(7), jnp.asarray(7, jnp.uint32)):
        assert sched(step) == expected
    with jax.enable_x64(True):
        assert sched(jnp.asarray(7, jnp.int64)) == expected
        assert jax.jit(sched)(jnp.asarray(7, jnp.int64)) == expected
    for bad in (True, "7"):
        with pytest.raises(TypeError, match="number|integer"):
            sched(bad)


@pytest.mark.parametrize("sched", [
    S.ExponentialDecay(0.1, 3, 0.5), S.PiecewiseConstantDecay([2, 5], [1.0, 2.0, 3.0]),
    S.PolynomialDecay(0.1, 13, power=0.5), S.InverseTimeDecay(0.1, 3, 0.5), S.CosineDecay(0.1, 20),
    S.CosineDecayRestarts(0.1, 4)], ids=lambda s: type(s).__name__)
def test_float_step_is_accepted_as_tf_keras_does(sched):
    """tf-keras and Keras 3 cast a float step to float32; a whole float gives the integer step's value."""
    for step in (7.0, np.float32(7), jnp.float32(7), np.array(7.0)):
        assert sched(step) == sched(7)


def test_user_schedule_serializes_as_tf_keras_does():
    class Halving(S.LearningRateSchedule):
        def __init__(self, lr):
            self.lr = lr

        def __call__(self, step):
            return self.lr / 2

        def get_config(self):
            return {"lr": self.lr}

    d = S.serialize(Halving(0.1))
    assert d == {"module": None, "class_name": "Halving", "config": {"lr": 0.1}, "registered_name": "Halving"}
    assert S.serialize(S.ExponentialDecay(0.1, 3, 0.5))["module"] == "keras.optimizers.schedules"
    assert isinstance(S.deserialize(d, custom_objects={"Halving": Halving}), Halving)


def test_piecewise_boundaries():
    sched = S.PiecewiseConstantDecay([2.5, 5], [1.0, 2.0, 3.0])  # 2.5 -> 2, as tf-keras casts it
    assert [float(sched(s)) for s in range(7)] == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0]
    assert sched.get_config()["boundaries"] == [2.5, 5]
    # Boundaries outside the step's dtype still compare exactly.
    big = S.PiecewiseConstantDecay([-(2**40), 2**40], [1.0, 2.0, 3.0])
    assert float(jax.jit(big)(jnp.int32(2**31 - 1))) == 2.0
    assert float(big(2**41)) == 3.0
    assert big(np.uint8(0)) == 2.0
    assert float(S.PiecewiseConstantDecay([3, 3], [1.0, 2.0, 3.0])(4)) == 3.0  # equal boundaries are allowed


@pytest.mark.tf
@pytest.mark.parametrize(("cls", "args", "kwargs"), CASES, ids=IDS)
def test_serialize_matches_tf_keras(tf_schedules, cls, args, kwargs):
    _, T = tf_schedules
    assert S.serialize(getattr(S, cls)(*args, **kwargs)) == T.serialize(getattr(T, cls)(*args, **kwargs))


@pytest.mark.tf
def test_serialize_plain_types_and_tuples_match_tf_keras(tf_schedules):
    _, T = tf_schedules
    args = (np.float32(0.1), np.int64(10), np.float64(0.9), np.bool_(True))
    ours = S.serialize(S.ExponentialDecay(*args))
    assert ours == T.serialize(T.ExponentialDecay(*args))
    assert [type(v) for v in ours["config"].values()] == [float, int, float, bool, type(None)]
    pw = ((1, 2.5), (1.0, 2.0, 3.0))
    assert S.serialize(S.PiecewiseConstantDecay(*pw)) == T.serialize(T.PiecewiseConstantDecay(*pw))


@pytest.mark.tf
def test_deserialize_accepts_tf_keras_and_keras3_dicts(tf_schedules, keras_schedules):
    _, T = tf_schedules
    for module in (T, keras_schedules):
        for cls, args, kwargs in CASES:
            ref = getattr(module, cls)(*args, **kwargs)
            for form in (module.serialize(ref), {"class_name": cls, "config": ref.get_config()}):
                ours = S.deserialize(form)
                assert type(ours) is getattr(S, cls)
                assert ours.get_config() == ref.get_config()


@pytest.mark.parametrize(("cls", "args", "kwargs"), CASES, ids=IDS)
def test_round_trip(cls, args, kwargs):
    sched = getattr(S, cls)(*args, **kwargs)
    config = S.serialize(sched)
    assert config["module"] == "keras.optimizers.schedules" and config["registered_name"] is None
    assert config["class_name"] == cls and config["config"]["name"] == kwargs.get("name")
    for form in (config, {"class_name": cls, "config": config["config"]}):
        again = S.deserialize(form)
        assert type(again) is type(sched) and again.get_config() == sched.get_config()
        assert S.serialize(again) == config
        np.testing.assert_array_equal(again(17), sched(17))
    assert type(sched).from_config(sched.get_config()).get_config() == sched.get_config()
    assert S.is_schedule(sched) and not S.is_schedule(0.1) and not S.is_schedule(lambda step: 0.1)


def test_config_has_every_default():
    assert S.CosineDecay(0.1, 10).get_config() == {
        "initial_learning_rate": 0.1, "decay_steps": 10, "alpha": 0.0, "name": None,
        "warmup_target": None, "warmup_steps": 0,
    }  # fmt: skip
    assert S.PolynomialDecay(0.1, 10).get_config() == {
        "initial_learning_rate": 0.1, "decay_steps": 10, "end_learning_rate": 0.0001, "power": 1.0,
        "cycle": False, "name": None,
    }  # fmt: skip
    assert S.CosineDecayRestarts(0.1, 10).get_config() == {
        "initial_learning_rate": 0.1, "first_decay_steps": 10, "t_mul": 2.0, "m_mul": 1.0, "alpha": 0.0,
        "name": None,
    }  # fmt: skip


def test_deserialize_errors():
    with pytest.raises(ValueError, match="'Bogus'"):
        S.deserialize({"class_name": "Bogus", "config": {}})
    with pytest.raises(ValueError, match="'PiecewiseConstant'"):  # an op name, not a class name
        S.deserialize({"class_name": "PiecewiseConstant", "config": {"boundaries": [1], "values": [1.0, 2.0]}})
    with pytest.raises(ValueError, match="class_name"):
        S.deserialize({"config": {}})
    with pytest.raises(TypeError):
        S.deserialize({"class_name": "CosineDecay", "config": {"initial_learning_rate": 0.1, "decay_step": 3}})
    with pytest.raises(TypeError):
        S.serialize(0.1)


def test_custom_schedule():
    class Halving(S.LearningRateSchedule):
        _CONFIG = ("rate",)

        def __init__(self, rate: float) -> None:
            self.rate = rate

        def __call__(self, step):
            return jnp.float32(self.rate) / jnp.exp2(jnp.asarray(step).astype(jnp.float32))

    config = S.serialize(Halving(0.5))
    assert config == {"module": None, "class_name": "Halving",  # as tf-keras writes a user's schedule
                      "config": {"rate": 0.5}, "registered_name": "Halving"}  # fmt: skip
    assert float(S.deserialize(config, custom_objects={"Halving": Halving})(1)) == 0.25
    with pytest.raises(ValueError, match="Halving"):
        S.deserialize(config)
    with pytest.raises(NotImplementedError, match="__call__"):
        S.LearningRateSchedule()(0)
    with pytest.raises(NotImplementedError, match="get_config"):
        S.LearningRateSchedule().get_config()


@pytest.mark.parametrize(
    ("cls", "arg", "make"),
    [
        ("ExponentialDecay", "decay_steps", lambda d: S.ExponentialDecay(0.1, d, 0.9)),
        ("PolynomialDecay", "decay_steps", lambda d: S.PolynomialDecay(0.1, d)),
        ("InverseTimeDecay", "decay_steps", lambda d: S.InverseTimeDecay(0.1, d, 0.5)),
        ("CosineDecay", "decay_steps", lambda d: S.CosineDecay(0.1, d)),
        ("CosineDecayRestarts", "first_decay_steps", lambda d: S.CosineDecayRestarts(0.1, d)),
    ],
)
def test_nonpositive_decay_steps_rejected(cls, arg, make):
    for bad in (0, -3, 0.0, float("nan")):
        with pytest.raises(ValueError, match=f"`{arg}` must be > 0"):
            make(bad)
    with pytest.raises(ValueError, match=arg):
        S.deserialize({"class_name": cls, "config": {**make(5).get_config(), arg: 0}})
    with pytest.raises(TypeError, match=arg):
        make("10")


def test_piecewise_argument_errors():
    with pytest.raises(ValueError, match="1 less than the length of values"):
        S.PiecewiseConstantDecay([1, 2], [1.0, 2.0])
    with pytest.raises(ValueError, match="1 less than the length of values"):
        S.PiecewiseConstantDecay([1], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="increasing"):
        S.PiecewiseConstantDecay([5, 2], [1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="values"):
        S.PiecewiseConstantDecay([5], [1.0, None])
