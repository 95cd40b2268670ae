"""`shardopt.tf.step_function`: the compiled step on tf.Variables through XlaCallModule, against tf-keras's Adam.

Real tensorflow-cpu, no mocks. Eager, inside `tf.function` with jit_compile off and on, across
`tf.saved_model.save` / `load`, from an artifact file, and with an artifact sharded over the 2x4 jax mesh.
"""

import numpy as np
import pytest

import shardopt

pytestmark = pytest.mark.tf

STEPS = 10
SHAPES = [(16, 8), (8,)]


@pytest.fixture(scope="module")
def env():
    tf = pytest.importorskip("tensorflow")
    import tf_keras

    import shardopt.tf as stf

    rng = np.random.default_rng(0)
    init = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    grads = [[rng.normal(size=s).astype(np.float32) for s in SHAPES] for _ in range(STEPS)]
    tf_vars = [tf.Variable(x) for x in init]
    step = shardopt.Adam(1e-3).compile(stf.variable_specs(tf_vars))  # one device: what TF runs best

    # tf-keras's own Adam (plain mode) on the same inputs: the reference trajectory.
    ref_vars = [tf.Variable(x) for x in init]
    ref_opt = tf_keras.optimizers.Adam(learning_rate=1e-3)
    trajectory = []
    for g in grads:
        ref_opt.apply_gradients(zip([tf.constant(x) for x in g], ref_vars, strict=True))
        trajectory.append([v.numpy() for v in ref_vars])
    ref_state = {"m": [m.numpy() for m in ref_opt._momentums], "v": [v.numpy() for v in ref_opt._velocities]}
    return {"tf": tf, "stf": stf, "step": step, "init": init, "grads": grads, "trajectory": trajectory,
            "ref_state": ref_state}


def fresh(env, artifact=None, **kw):
    tf = env["tf"]
    variables = [tf.Variable(x) for x in env["init"]]
    return variables, env["stf"].step_function(artifact or env["step"], variables, **kw)


def check_trajectory(env, variables, run_step, steps=STEPS, start=0):
    for i in range(start, start + steps):
        it = run_step([env["tf"].constant(x) for x in env["grads"][i]])
        assert int(it) == i + 1
        for got, want in zip(variables, env["trajectory"][i], strict=True):
            np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=1e-7)


def test_eager_matches_tf_keras_adam(env):
    variables, opt = fresh(env)
    assert isinstance(opt, env["tf"].Module)
    check_trajectory(env, variables, opt)
    state = opt.state()
    for slot in ("m", "v"):
        for got, want in zip(state["slots"][slot], env["ref_state"][slot], strict=True):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-9)
    assert state["iterations"] == STEPS


def test_matches_the_jax_step(env):
    variables, opt = fresh(env)
    step = env["step"]
    params = step.place_params([np.asarray(x) for x in env["init"]])
    state = step.init(params)
    for g in env["grads"][:3]:
        opt([env["tf"].constant(x) for x in g])
        params, state = step(params, g, state)
    for got, want in zip(variables, params, strict=True):
        np.testing.assert_array_equal(got.numpy(), np.asarray(want))  # same module, same XLA CPU: bitwise


@pytest.mark.parametrize("jit_compile", [False, True])
def test_inside_tf_function(env, jit_compile):
    tf = env["tf"]
    variables, opt = fresh(env)

    @tf.function(jit_compile=jit_compile)
    def train_step(grads):
        return opt(grads)

    check_trajectory(env, variables, train_step)


def test_survives_saved_model(env, tmp_path):
    tf = env["tf"]
    variables, opt = fresh(env)
    root = tf.Module()
    root.variables_ = variables
    root.optimizer = opt
    root.train_step = tf.function(lambda grads: root.optimizer.apply(grads),
                                  input_signature=[[tf.TensorSpec(s, tf.float32) for s in SHAPES]])
    check_trajectory(env, variables, root.train_step, steps=3)
    tf.saved_model.save(root, str(tmp_path / "model"))
    loaded = tf.saved_model.load(str(tmp_path / "model"))
    assert int(loaded.optimizer.iterations.numpy()) == 3
    check_trajectory(env, loaded.variables_, loaded.train_step, steps=3, start=3)
    check_trajectory(env, loaded.variables_, loaded.optimizer.apply, steps=3, start=6)  # the module's own fn
    np.testing.assert_allclose(variables[0].numpy(), env["trajectory"][2][0], rtol=2e-5)  # original: 3 steps


def test_from_an_artifact_file(env, tmp_path):
    path = tmp_path / "adam.shardopt"
    env["step"].save(path)
    variables, opt = fresh(env, artifact=str(path))
    check_trajectory(env, variables, opt, steps=3)


def test_sharded_artifact_runs_unsharded_in_tf(env, mesh):
    tf, stf = env["tf"], env["stf"]
    specs = stf.variable_specs([tf.Variable(x) for x in env["init"]])
    specs[0] = shardopt.VariableSpec(SHAPES[0], "float32", shardopt.Layout([shardopt.UNSHARDED, "model"], mesh),
                                     specs[0].name)
    step = shardopt.Adam(1e-3, mesh=mesh).compile(specs)
    assert step.executable.exported.nr_devices == 8
    variables, opt = fresh(env, artifact=step)
    check_trajectory(env, variables, opt, steps=3)


def test_learning_rate_is_a_variable(env):
    variables, opt = fresh(env)
    opt.learning_rate.assign(0.0)
    opt([env["tf"].constant(x) for x in env["grads"][0]])
    np.testing.assert_array_equal(variables[0].numpy(), env["init"][0])


def test_schedule_reports_the_rate_it_used(env):
    tf, stf = env["tf"], env["stf"]
    schedule = shardopt.schedules.ExponentialDecay(1e-3, 1, 0.5)
    step = shardopt.Adam(schedule).compile(stf.variable_specs([tf.Variable(x) for x in env["init"]]))
    variables, opt = fresh(env, artifact=step)
    params = step.place_params([np.asarray(x) for x in env["init"]])
    state = step.init(params)
    for i in range(3):
        opt([tf.constant(x) for x in env["grads"][i]])
        params, state = step(params, env["grads"][i], state)
        np.testing.assert_allclose(opt.learning_rate.numpy(), 1e-3 * 0.5**i, rtol=1e-6)
    for got, want in zip(variables, params, strict=True):
        np.testing.assert_array_equal(got.numpy(), np.asarray(want))


def test_wrong_variables_are_rejected(env):
    tf, stf = env["tf"], env["stf"]
    with pytest.raises(shardopt.StepInputError, match="updates 2 variables"):
        stf.step_function(env["step"], [tf.Variable(env["init"][0])])
    with pytest.raises(shardopt.StepInputError, match=r"expects float32\[16, 8\]"):
        stf.step_function(env["step"], [tf.Variable(env["init"][0].T), tf.Variable(env["init"][1])])
    with pytest.raises(TypeError, match="tf.Variable"):
        stf.step_function(env["step"], [tf.constant(x) for x in env["init"]])


def test_slots_line_up_with_the_variables_when_some_have_none(env):
    """Adafactor keeps `r`/`c` only for matrices: `state()["slots"]` has None for the vector, not a shorter list,
    and the values match tf-keras's Adafactor after a few steps."""
    import tf_keras

    tf = env["tf"]
    init, grads = env["init"], env["grads"][:3]
    variables = [tf.Variable(x) for x in init]
    step = shardopt.Adafactor(1e-2).compile(env["stf"].variable_specs(variables))
    module = env["stf"].step_function(step, variables)
    ref_vars = [tf.Variable(x) for x in init]
    ref = tf_keras.optimizers.Adafactor(learning_rate=1e-2)
    for g in grads:
        module([tf.constant(x) for x in g])
        ref.apply_gradients(zip([tf.constant(x) for x in g], ref_vars, strict=True))
    slots = module.state()["slots"]
    assert [x is None for x in slots["r"]] == [False, True] and [x is None for x in slots["c"]] == [False, True]
    np.testing.assert_allclose(slots["r"][0], ref._r[0].numpy(), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(slots["v"][1], ref._v[1].numpy(), rtol=1e-5, atol=1e-8)
    for got, want in zip(variables, ref_vars, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-7)
