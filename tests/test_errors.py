"""Spec §9, row by row: construction and apply errors with tf-keras's error types (clear ValueError/TypeError naming
the variable where tf raises InvalidArgumentError), what is accepted silently, layout errors, and "nothing is
lost": a failing step leaves every variable and slot readable and unchanged, and the next good step works."""

import jax
import numpy as np
import pytest

import shardopt
from shardopt import UNSHARDED, Layout
from shardopt import schedules as so_schedules


def f32(*shape, fill=1.0):
    return np.full(shape, fill, np.float32)


# ----- construction -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(clipnorm=1.0, global_clipnorm=1.0), ValueError, "At most one of `clipnorm` and `global_clipnorm`"),
    (dict(clipnorm=-1.0, global_clipnorm=0.0), ValueError, "At most one of"),
    (dict(use_ema=True, ema_momentum=1.5), ValueError, "`ema_momentum` must be in the range"),
    (dict(use_ema=True, ema_momentum=-0.1), ValueError, "`ema_momentum` must be in the range"),
    (dict(use_ema=True, ema_overwrite_frequency=-1), ValueError, "ema_overwrite_frequency"),
    (dict(use_ema=True, ema_overwrite_frequency=2.0), ValueError, "ema_overwrite_frequency"),
    (dict(foo=1), TypeError, "foo is not a valid argument"),
    (dict(lr=0.1), TypeError, "`lr`.*learning_rate="),
    (dict(decay=0.1), ValueError, "decay is deprecated"),
    (dict(gradient_aggregator=None), ValueError, "gradient_aggregator is deprecated"),
    (dict(gradient_transformers=[]), ValueError, "gradient_transformers is deprecated"),
    (dict(learning_rate=None), ValueError, "learning_rate"),
    (dict(learning_rate="0.1"), TypeError, "learning_rate"),
    (dict(learning_rate=lambda: "0.1"), TypeError, "learning_rate"),
], ids=lambda x: None if isinstance(x, dict | type) else str(x)[:30])
def test_construction_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        shardopt.Adam(**kwargs)


def test_construction_checks_run_in_tf_keras_order():
    # EMA before clipping before kwargs before the learning rate: the first failing check raises.
    with pytest.raises(ValueError, match="ema_momentum"):
        shardopt.Adam(use_ema=True, ema_momentum=2.0, clipnorm=1.0, global_clipnorm=1.0, foo=1)
    with pytest.raises(ValueError, match="At most one"):
        shardopt.Adam(clipnorm=1.0, global_clipnorm=1.0, foo=1, learning_rate="x")
    with pytest.raises(TypeError, match="foo"):
        shardopt.Adam(foo=1, learning_rate="x")


# beta_1=1.0 / beta_2=-0.5 were accepted here as tf-keras accepts them; issue 13 refuses betas out of range (the
# first step divides by 1 - beta_1**t = 0), see tests/test_reliability_constructor.py. beta_1=0, beta_2=1 remain.
@pytest.mark.parametrize("kwargs", [
    dict(learning_rate=-0.1), dict(learning_rate=1), dict(beta_1=0.0, beta_2=1.0), dict(epsilon=0.0),
    dict(clipnorm=0.0), dict(clipvalue=-1.0), dict(global_clipnorm=-2.0),
    dict(use_ema=False, ema_momentum=7.0, ema_overwrite_frequency=-3),
    dict(use_ema=True, ema_overwrite_frequency=0), dict(use_ema=True, ema_overwrite_frequency=1),
    dict(is_legacy_optimizer=True), dict(jit_compile=False),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_accepted_silently(kwargs, recwarn):
    shardopt.Adam(**kwargs)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_unknown_from_config_key_is_a_type_error():
    config = shardopt.Adam().get_config()
    with pytest.raises(TypeError, match="bogus"):
        shardopt.Adam.from_config({**config, "bogus": 1})


@pytest.mark.parametrize("make, match", [
    (lambda: so_schedules.PiecewiseConstantDecay([1, 2], [0.1, 0.2]), "length of boundaries"),
    (lambda: so_schedules.PiecewiseConstantDecay([1], [0.1, 0.2, 0.3]), "length of boundaries"),
    (lambda: so_schedules.ExponentialDecay(0.1, 0, 0.5), "decay_steps"),
    (lambda: so_schedules.CosineDecay(0.1, -3), "decay_steps"),
], ids=["piecewise_short", "piecewise_long", "exponential_zero_steps", "cosine_negative_steps"])
def test_schedule_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ----- applying ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(mesh):
    """A built optimizer over a sharded and a replicated variable, one good step taken (one compile)."""
    kernel = shardopt.Variable(np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8), name="dense/kernel",
                               layout=Layout([UNSHARDED, "model"], mesh))
    bias = shardopt.Variable(np.zeros((8,), np.float32), name="dense/bias")
    opt = shardopt.Adam(learning_rate=0.01, mesh=mesh)
    opt.apply_gradients([(f32(8, 8, fill=0.5), kernel), (f32(8, fill=-0.25), bias)])
    return opt, kernel, bias


def snapshot(opt, *variables):
    return {v.name: v.numpy().copy() for v in [*variables, *opt.variables]}


def assert_unchanged(before, opt, *variables):
    after = snapshot(opt, *variables)
    assert sorted(after) == sorted(before)
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)


@pytest.mark.parametrize("pairs, error, match", [
    (lambda k, b: [(None, k), (None, b)], ValueError, "No gradients provided for any variable"),
    (lambda k, b: [(f32(8, 8), shardopt.Variable(f32(8, 8), name="stranger"))], KeyError,
     "cannot recognize variable stranger"),
    (lambda k, b: [(f32(3, 8), k)], ValueError, r"'dense/kernel' has shape \(3, 8\)"),
    (lambda k, b: [(f32(8, 8), k), (f32(7), b)], ValueError, "'dense/bias' has shape"),
    (lambda k, b: [(np.ones((8, 8)), k)], TypeError, "'dense/kernel' has dtype float64"),
    (lambda k, b: [(f32(8, 8).astype(np.float16), k)], TypeError, "'dense/kernel' has dtype float16"),
    (lambda k, b: [(shardopt.IndexedSlices(np.ones((2, 8)), np.array([0, 1]), (8, 8)), k)], TypeError,
     "'dense/kernel' has dtype float64"),
    (lambda k, b: [(shardopt.IndexedSlices(f32(2, 8), np.array([0, 9]), (8, 8)), k)], ValueError,
     r"'dense/kernel'.*indices must be in \[0, 8\)"),
], ids=["all_none", "unknown_variable", "bad_shape", "bad_shape_second", "float64_grad", "float16_grad",
        "sparse_float64", "sparse_out_of_range"])
def test_apply_errors_lose_nothing(built, pairs, error, match):
    opt, kernel, bias = built
    before = snapshot(opt, kernel, bias)
    with pytest.raises(error, match=match):
        opt.apply_gradients(pairs(kernel, bias))
    assert_unchanged(before, opt, kernel, bias)


def test_int_variable_is_a_type_error_naming_it(mesh):
    counts = shardopt.Variable(np.arange(4, dtype=np.int32), name="counts")
    with pytest.raises(TypeError, match="'counts' has dtype int32"):
        shardopt.Adam(mesh=mesh).apply_gradients([(np.ones(4, np.int32), counts)])


def test_global_clipnorm_over_mixed_dtypes_is_a_type_error(mesh):
    a = shardopt.Variable(f32(4), name="a")
    h = shardopt.Variable(np.ones(4, np.float16), name="h")
    with pytest.raises(TypeError, match="global_clipnorm.*float16.*float32"):
        shardopt.Adam(global_clipnorm=1.0, mesh=mesh).apply_gradients([(f32(4), a), (np.ones(4, np.float16), h)])


def test_setting_a_float_learning_rate_on_a_schedule_optimizer_is_a_type_error():
    opt = shardopt.Adam(learning_rate=so_schedules.ExponentialDecay(0.1, 10, 0.5))
    with pytest.raises(TypeError, match="LearningRateSchedule"):
        opt.learning_rate = 0.5
    with pytest.raises(TypeError, match="LearningRateSchedule"):
        opt.lr = 0.5


def test_setting_iterations_after_build_is_a_runtime_error(built):
    opt, kernel, bias = built
    before = snapshot(opt, kernel, bias)
    with pytest.raises(RuntimeError, match="iterations"):
        opt.iterations = 3
    assert_unchanged(before, opt, kernel, bias)


# ----- layouts ----------------------------------------------------------------------------------------------------
def test_unknown_mesh_axis_names_variable_dimension_and_axis(mesh):
    with pytest.raises(ValueError, match=r"'w'.*dimension 1.*unknown mesh axis 'tensor'"):
        shardopt.Variable(f32(4, 8), name="w", layout=Layout(["batch", "tensor"], mesh))


def test_non_divisible_dimension_names_variable_dimension_and_axis(mesh):
    with pytest.raises(ValueError, match=r"'w'.*dimension 0 of size 5.*not divisible by mesh axis model of size 4"):
        shardopt.Variable(f32(5, 8), name="w", layout=Layout(["model", UNSHARDED], mesh))


def test_variable_on_another_mesh_names_it(mesh, mesh8):
    w = shardopt.Variable(f32(8), name="w", layout=Layout(["x"], mesh8))
    opt = shardopt.Adam(mesh=mesh)
    with pytest.raises(ValueError, match=r"'w' is laid out on a different mesh"):
        opt.apply_gradients([(f32(8), w)])
    np.testing.assert_array_equal(w.numpy(), f32(8))


# ----- nothing is lost --------------------------------------------------------------------------------------------
def _adam_two_steps(x0, g1, g2, lr=0.01):
    """Two default Adam steps in numpy (spec §4)."""
    m = v = np.zeros_like(x0)
    x = x0
    for t, g in ((1, g1), (2, g2)):
        m = m + (g - m) * np.float32(0.1)
        v = v + (g * g - v) * np.float32(1 - 0.999)
        alpha = np.float32(lr) * np.sqrt(1 - np.float32(0.999) ** t) / (1 - np.float32(0.9) ** t)
        x = x - m * alpha / (np.sqrt(v) + np.float32(1e-7))
    return x, m, v


def test_failed_steps_lose_nothing_and_the_next_step_works(mesh):
    kernel0 = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    kernel = shardopt.Variable(kernel0, name="kernel", layout=Layout([UNSHARDED, "model"], mesh))
    bias = shardopt.Variable(np.zeros((8,), np.float32), name="bias")
    opt = shardopt.Adam(learning_rate=0.01, mesh=mesh)
    g1k, g1b, g2k, g2b = f32(8, 8, fill=0.5), f32(8, fill=-0.25), f32(8, 8, fill=-0.1), f32(8, fill=0.3)
    opt.apply_gradients([(g1k, kernel), (g1b, bias)])
    before = snapshot(opt, kernel, bias)

    with pytest.raises(ValueError, match="'kernel' has shape"):      # bad shape
        opt.apply_gradients([(f32(4, 8), kernel), (g2b, bias)])
    with pytest.raises(TypeError, match="'bias' has dtype float64"):  # bad dtype
        opt.apply_gradients([(g2k, kernel), (np.zeros(8), bias)])
    # Bad sharding of a donated input: the kernel is re-laid out after build, its slots are not; the step checks
    # every input before it runs, so nothing has been donated when it refuses.
    kernel.place(Layout(["model", UNSHARDED], mesh))
    with pytest.raises(shardopt.StepInputError, match="m/kernel: expected sharding"):
        opt.apply_gradients([(g2k, kernel), (g2b, bias)])
    assert_unchanged(before, opt, kernel, bias)
    assert all(not v.value.is_deleted() for v in [kernel, bias, *opt.variables])

    kernel.place(Layout([UNSHARDED, "model"], mesh))
    opt.apply_gradients([(g2k, kernel), (g2b, bias)])
    assert int(opt.iterations.value) == 2
    for var, init, g1, g2 in ((kernel, kernel0, g1k, g2k), (bias, np.zeros(8, np.float32), g1b, g2b)):
        x, m, v = _adam_two_steps(init, g1, g2)
        np.testing.assert_allclose(var.numpy(), x, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(opt.get_slot(var, "m").numpy(), m, rtol=2e-5, atol=1e-8)
        np.testing.assert_allclose(opt.get_slot(var, "v").numpy(), v, rtol=2e-5, atol=1e-10)


def test_a_deleted_donated_input_is_refused_before_running(built):
    """The runtime check behind "nothing is lost": a donated input that is no longer valid stops the call."""
    opt, kernel, bias = built
    program = opt.program_for([(f32(8, 8), kernel), (f32(8), bias)])
    args = [kernel.value, bias.value, f32(8, 8), f32(8)] + [opt.get_slot(v, s).value for v in (kernel, bias)
                                                            for s in ("m", "v")]
    args += [opt.iterations.value, jax.numpy.float32(0.01)]
    wrong = list(args)
    wrong[0] = jax.device_put(kernel.numpy(), jax.sharding.NamedSharding(kernel.value.sharding.mesh,
                                                                          jax.sharding.PartitionSpec("batch")))
    before = snapshot(opt, kernel, bias)
    with pytest.raises(shardopt.StepInputError, match="dense/kernel: expected sharding"):
        program.executable(wrong)
    assert not wrong[0].is_deleted()
    assert_unchanged(before, opt, kernel, bias)


def test_variable_value_passed_as_its_own_gradient_is_refused_not_a_crash():
    """XLA segfaults when one buffer is both donated and read in the same call; the step refuses it first."""
    var = shardopt.Variable(np.ones((4,), np.float32), name="same")
    opt = shardopt.Adam(0.1)
    opt.apply_gradients([(np.ones(4, np.float32), var)])
    before = np.asarray(var.value).copy()
    with pytest.raises(shardopt.StepInputError, match="same array"):
        opt.apply_gradients([(var.value, var)])
    np.testing.assert_array_equal(np.asarray(var.value), before)
    opt.apply_gradients([(var.value + 0, var)])
    assert int(opt.iterations.value) == 2
