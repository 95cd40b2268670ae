"""`shardopt.tf_keras.Adam` in tf-keras's `model.compile` / `model.fit` (issue 12, wall 4): the step runs through
XlaCallModule; 20 steps beside `tf_keras.optimizers.Adam` agree to 1e-6 (measured: 6e-8, XLA fuses what TF
rounds twice); `iterations` counts; `.keras` files and `tf.train.Checkpoint` round-trip and resume bitwise.

Before: "Could not interpret optimizer identifier" for `shardopt.Adam`, and a hand-written bridge needed a custom
`train_step` with a dummy optimizer whose `iterations` stayed 0.
"""

import numpy as np
import pytest

pytestmark = pytest.mark.tf

rng = np.random.default_rng(0)
X = rng.normal(size=(80, 8)).astype(np.float32)
Y = np.sin(X.sum(1, keepdims=True)).astype(np.float32)
BATCH = 16  # 5 steps an epoch


@pytest.fixture(scope="module")
def tfk():
    import tensorflow as tf
    import tf_keras

    import shardopt.tf_keras

    return tf, tf_keras, shardopt.tf_keras


def make_model(tf_keras):
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential([tf_keras.layers.Dense(16, activation="tanh"), tf_keras.layers.Dense(1)])
    model.build((None, 8))
    return model


def fit(tf_keras, optimizer, epochs=4, model=None):
    model = model or make_model(tf_keras)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(X, Y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    return model


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b, strict=True))


def test_the_stateful_optimizer_is_not_a_tf_keras_one(tfk):
    import shardopt

    tf, tf_keras, _ = tfk
    with pytest.raises(ValueError, match="Could not interpret optimizer identifier"):
        fit(tf_keras, shardopt.Adam(1e-3), epochs=1)


@pytest.mark.parametrize("config", [{}, {"amsgrad": True, "beta_1": 0.8}, {"global_clipnorm": 0.5}])
def test_fit_matches_tf_keras_adam(tfk, config):
    tf, tf_keras, stk = tfk
    ours = fit(tf_keras, stk.Adam(learning_rate=1e-2, **config))
    ref = fit(tf_keras, tf_keras.optimizers.Adam(learning_rate=1e-2, **config))
    assert isinstance(ours.optimizer, tf_keras.optimizers.Optimizer)
    assert int(ours.optimizer.iterations.numpy()) == 20
    assert max_diff(ours.get_weights(), ref.get_weights()) <= 1e-6


def test_keras_file_round_trip_resumes(tfk, tmp_path):
    tf, tf_keras, stk = tfk
    model = fit(tf_keras, stk.Adam(learning_rate=1e-2), epochs=2)
    model.save(tmp_path / "model.keras")
    loaded = tf_keras.models.load_model(tmp_path / "model.keras")
    assert type(loaded.optimizer) is stk.Adam
    assert int(loaded.optimizer.iterations.numpy()) == 10
    assert max_diff(loaded.optimizer.variables, model.optimizer.variables) == 0
    for m in (model, loaded):
        m.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert max_diff(loaded.get_weights(), model.get_weights()) == 0
    assert int(loaded.optimizer.iterations.numpy()) == 15


def test_tf_train_checkpoint_round_trip_resumes(tfk, tmp_path):
    tf, tf_keras, stk = tfk
    model = fit(tf_keras, stk.Adam(learning_rate=1e-2), epochs=2)
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(tmp_path / "ckpt"))
    fresh_model = make_model(tf_keras)
    fresh = stk.Adam(learning_rate=1e-2)
    fresh.build(fresh_model.trainable_variables)
    tf.train.Checkpoint(model=fresh_model, optimizer=fresh).restore(path).assert_existing_objects_matched()
    assert int(fresh.iterations.numpy()) == 10
    assert max_diff(fresh.variables, model.optimizer.variables) == 0
    fit(tf_keras, fresh, epochs=1, model=fresh_model)
    model.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert max_diff(fresh_model.get_weights(), model.get_weights()) == 0
