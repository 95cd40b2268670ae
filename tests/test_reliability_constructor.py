"""Constructor arguments (issue 13): NaN/inf and out-of-range hyperparameters, wrong types and wrong grouped
options are refused at construction with the argument's name; a property-based test checks that any set of
arguments either constructs an optimizer whose first step matches the numpy reference, or raises a
TypeError/ValueError that names a culprit argument."""

import math
import re
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_adam_spec import F32_TOL, ReferenceAdam

import shardopt

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kwargs, error, culprit", [
    (dict(learning_rate=NAN), ValueError, "learning_rate"),
    (dict(learning_rate=INF), ValueError, "learning_rate"),
    (dict(learning_rate=-INF), ValueError, "learning_rate"),
    (dict(learning_rate=lambda: NAN), ValueError, "learning_rate"),
    (dict(learning_rate=[0.1]), TypeError, "learning_rate"),
    (dict(learning_rate=True), TypeError, "learning_rate"),
    (dict(beta_1=1.0), ValueError, "beta_1"),
    (dict(beta_1=1.5), ValueError, "beta_1"),
    (dict(beta_1=-0.1), ValueError, "beta_1"),
    (dict(beta_1=NAN), ValueError, "beta_1"),
    (dict(beta_1=INF), ValueError, "beta_1"),
    (dict(beta_2=1.0001), ValueError, "beta_2"),
    (dict(beta_2=-0.5), ValueError, "beta_2"),
    (dict(beta_2=NAN), ValueError, "beta_2"),
    (dict(epsilon=NAN), ValueError, "epsilon"),
    (dict(epsilon=INF), ValueError, "epsilon"),
    (dict(clipnorm=INF), ValueError, "clipnorm"),
    (dict(clipnorm=NAN), ValueError, "clipnorm"),
    (dict(global_clipnorm=INF), ValueError, "global_clipnorm"),
    (dict(global_clipnorm=NAN), ValueError, "global_clipnorm"),
    (dict(clipvalue=INF), ValueError, "clipvalue"),
    (dict(clipvalue=NAN), ValueError, "clipvalue"),
    (dict(weight_decay=NAN), ValueError, "weight_decay"),
    (dict(weight_decay=-INF), ValueError, "weight_decay"),
    (dict(beta_1="0.9"), TypeError, "beta_1"),
    (dict(beta_2=None), TypeError, "beta_2"),
    (dict(epsilon=[1e-7]), TypeError, "epsilon"),
    (dict(weight_decay="0.1"), TypeError, "weight_decay"),
    (dict(clipnorm="1.0"), TypeError, "clipnorm"),
    (dict(global_clipnorm=[1.0]), TypeError, "global_clipnorm"),
    (dict(use_ema=True, ema_momentum="0.99"), TypeError, "ema_momentum"),
    (dict(use_ema=True, ema_momentum=NAN), ValueError, "ema_momentum"),
    (dict(use_ema=True, ema_overwrite_frequency="3"), TypeError, "ema_overwrite_frequency"),
    (dict(use_ema="no"), TypeError, "use_ema"),
    (dict(use_ema=None), TypeError, "use_ema"),
    (dict(amsgrad="yes"), TypeError, "amsgrad"),
    (dict(amsgrad=None), TypeError, "amsgrad"),
    (dict(adaptive_epsilon="false"), TypeError, "adaptive_epsilon"),
    (dict(gradients_clip_option={"clipnorm": 1.0}), TypeError, "gradients_clip_option"),
    (dict(ema_option={"use_ema": True}), TypeError, "ema_option"),
    (dict(gradients_clip_option=shardopt.EMAOption()), TypeError, "gradients_clip_option"),
], ids=lambda x: None if isinstance(x, dict | type) else str(x))
def test_bad_arguments_are_refused_at_construction_naming_them(kwargs, error, culprit):
    with pytest.raises(error, match=rf"(?<![a-z_]){culprit}(?![a-z_])"):
        shardopt.Adam(**kwargs)


def test_a_dict_option_says_how_to_pass_it():
    with pytest.raises(TypeError, match=r"GradientsClipOption\(\*\*d\)"):
        shardopt.Adam(gradients_clip_option={"clipnorm": 1.0})


@pytest.mark.parametrize("kwargs", [
    dict(use_ema=True, ema_overwrite_frequency=np.int64(3)),
    dict(use_ema=True, ema_overwrite_frequency=np.int32(1)),
    dict(use_ema=np.bool_(True), amsgrad=np.bool_(False)),
    dict(learning_rate=np.float32(0.01), beta_1=np.float64(0.8), beta_2=np.float32(0.99), epsilon=np.float32(1e-6)),
    dict(beta_1=0.0, beta_2=1.0, epsilon=0.0, clipvalue=0.0),
    dict(learning_rate=np.asarray(0.01)),
    dict(weight_decay=0.0, clipnorm=np.float32(2.0)),
], ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()))
def test_numpy_scalars_and_edge_values_are_accepted(kwargs):
    opt = shardopt.Adam(**kwargs)
    if "ema_overwrite_frequency" in kwargs:
        assert opt.ema_overwrite_frequency == int(kwargs["ema_overwrite_frequency"])
        assert type(opt.get_config()["ema_overwrite_frequency"]) is int


def test_a_numpy_integer_ema_overwrite_frequency_overwrites_on_schedule():
    var = shardopt.Variable(np.ones(4, np.float32), name="w")
    opt = shardopt.Adam(0.1, use_ema=True, ema_overwrite_frequency=np.int64(2))
    ref = ReferenceAdam({"w": np.ones(4, np.float32)}, 0.1, use_ema=True, ema_overwrite_frequency=2)
    g = np.array([0.5, -0.25, 1.0, 2.0], np.float32)
    for _ in range(3):
        opt.apply_gradients([(g, var)])
        ref.step({"w": g})
        np.testing.assert_allclose(var.numpy(), ref.vars["w"], **F32_TOL)


def test_setting_a_nan_learning_rate_later_is_refused_too():
    opt = shardopt.Adam(0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        opt.learning_rate = NAN
    assert float(opt.learning_rate) == pytest.approx(0.1)


# ----- property: a clear error naming a culprit, or the reference's result -------------------------------------
GOOD = object()  # tag for draws that are valid


def floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


BAD_FLOATS = st.sampled_from([NAN, INF, -INF, "0.1", [0.5], True])


def arg(good, bad):
    """A (value, is_bad) draw: good values four times as often as bad ones."""
    ok = good.map(lambda v: (v, False))
    return st.one_of(ok, ok, ok, ok, bad.map(lambda v: (v, True)))


ARGS = {
    "learning_rate": arg(floats(-0.5, 0.5), BAD_FLOATS),
    "beta_1": arg(floats(0.0, 0.999), st.one_of(BAD_FLOATS, st.sampled_from([1.0, 1.5, -0.1, None]))),
    "beta_2": arg(floats(0.0, 1.0), st.one_of(BAD_FLOATS, st.sampled_from([1.001, -0.5, None]))),
    "epsilon": arg(floats(1e-7, 1.0), st.one_of(BAD_FLOATS, st.just(None))),
    "amsgrad": arg(st.booleans(), st.sampled_from(["yes", None, 1])),
    "weight_decay": arg(st.one_of(st.none(), floats(0.0, 0.1)), BAD_FLOATS),
    "clipnorm": arg(st.one_of(st.none(), floats(0.01, 10.0)), BAD_FLOATS),
    "global_clipnorm": arg(st.one_of(st.none(), floats(0.01, 10.0)), BAD_FLOATS),
    "clipvalue": arg(st.one_of(st.none(), floats(0.01, 10.0)), BAD_FLOATS),
    "use_ema": arg(st.booleans(), st.sampled_from(["no", None])),
    "ema_momentum": arg(floats(0.0, 1.0), st.one_of(BAD_FLOATS, st.sampled_from([1.5, -0.1]))),
    "ema_overwrite_frequency": arg(st.sampled_from([None, 0, 1, 2, np.int64(1), np.int32(2)]),
                                   st.sampled_from([-1, 2.0, "3"])),
    "gradients_clip_option": arg(st.none(), st.just({"clipnorm": 1.0})),
    "ema_option": arg(st.none(), st.just({"use_ema": True})),
}


def culprits(drawn):
    """The names whose values make the arguments invalid (an EMA argument only counts when EMA is on)."""
    bad = {k for k, (_, is_bad) in drawn.items() if is_bad}
    ema_on = drawn.get("use_ema", (False, False))[0] is True
    if not ema_on:
        bad -= {"ema_momentum", "ema_overwrite_frequency"}
    if drawn.get("clipnorm", (None,))[0] is not None and drawn.get("global_clipnorm", (None,))[0] is not None:
        bad |= {"clipnorm", "global_clipnorm"}
    return bad


@st.composite
def constructor_arguments(draw):
    names = draw(st.lists(st.sampled_from(sorted(ARGS)), unique=True, max_size=6))
    return {name: draw(ARGS[name]) for name in names}


def names_one_of(message, names):
    return any(re.search(rf"(?<![a-z_]){n}(?![a-z_])", message) for n in names)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=constructor_arguments())
def test_any_arguments_give_a_named_error_or_the_reference_step(drawn):
    kwargs = {k: v for k, (v, _) in drawn.items()}
    bad = culprits(drawn)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # clipvalue with clipnorm: tf-keras's precedence warning
            opt = shardopt.Adam(**kwargs)
    except (TypeError, ValueError) as e:
        event("refused")
        assert bad, f"valid arguments {kwargs} refused: {e}"
        assert names_one_of(str(e), bad), f"{type(e).__name__}: {e!r} does not name one of {sorted(bad)}"
        return
    assert not bad, f"invalid {sorted(bad)} accepted: {kwargs}"
    event("constructed and stepped")
    x0 = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    g = np.array([0.5, -0.25, 1.0, 2.0], np.float32)
    var = shardopt.Variable(x0, name="w")
    opt.apply_gradients([(g, var)])
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in ("gradients_clip_option", "ema_option")}
    if isinstance(ref_kwargs.get("ema_overwrite_frequency"), np.integer):
        ref_kwargs["ema_overwrite_frequency"] = int(ref_kwargs["ema_overwrite_frequency"])
    ref = ReferenceAdam({"w": x0}, **ref_kwargs)
    ref.step({"w": g})
    got = {"w": var.numpy(), "m": opt.get_slot(var, "m").numpy(), "v": opt.get_slot(var, "v").numpy()}
    assert all(np.isfinite(a).all() for a in got.values()), got
    np.testing.assert_allclose(got["w"], ref.vars["w"], **F32_TOL)
    np.testing.assert_allclose(got["m"], ref.slots["w"]["m"], **F32_TOL)
    np.testing.assert_allclose(got["v"], ref.slots["w"]["v"], **F32_TOL)
    assert math.isfinite(float(opt.learning_rate))
