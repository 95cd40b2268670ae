"""`shardopt.keras.Adam` in Keras 3's `model.compile` / `model.fit` on the JAX backend (issue 12, wall 3).

`model.compile(optimizer=shardopt.Adam(...))` fails with "Could not interpret optimizer identifier" (the stateful
optimizer is not a Keras one); `shardopt.keras.Adam` is a `keras.optimizers.Optimizer` running shardopt's
compiled step. Trained 20 steps beside `keras.optimizers.Adam`: the weights agree bitwise (measured; asserted
to 1e-6), the counter counts and `.keras` files round-trip.
"""

import keras
import numpy as np
import pytest

import shardopt

rng = np.random.default_rng(0)
X = rng.normal(size=(80, 8)).astype(np.float32)
Y = np.sin(X.sum(1, keepdims=True)).astype(np.float32)
BATCH = 16  # 5 steps an epoch


def model_fit(optimizer, epochs=4):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(X, Y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    return model


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b, strict=True))


def test_the_stateful_optimizer_is_not_a_keras_one():
    with pytest.raises(ValueError, match="Could not interpret optimizer identifier"):
        model_fit(shardopt.Adam(1e-3), epochs=1)


@pytest.mark.parametrize("config", [{}, {"amsgrad": True, "beta_1": 0.8, "epsilon": 1e-4},
                                    {"global_clipnorm": 0.5}, {"weight_decay": 0.05}])
def test_fit_matches_keras_adam(config):
    ours = model_fit(shardopt.keras.Adam(learning_rate=1e-2, **config))
    ref = model_fit(keras.optimizers.Adam(learning_rate=1e-2, **config))
    assert isinstance(ours.optimizer, keras.optimizers.Optimizer)
    assert int(ours.optimizer.iterations.value) == 20
    assert max_diff(ours.get_weights(), ref.get_weights()) <= 1e-6


def test_fit_with_a_keras_schedule():
    schedule = lambda: keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=4, decay_rate=0.5)
    ours = model_fit(shardopt.keras.Adam(learning_rate=schedule()))
    ref = model_fit(keras.optimizers.Adam(learning_rate=schedule()))
    assert max_diff(ours.get_weights(), ref.get_weights()) <= 1e-6


def test_keras_file_round_trip_resumes(tmp_path):
    model = model_fit(shardopt.keras.Adam(learning_rate=1e-2, amsgrad=True), epochs=2)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert type(loaded.optimizer) is shardopt.keras.Adam
    assert loaded.optimizer.get_config()["amsgrad"] is True
    assert int(loaded.optimizer.iterations.value) == 10
    assert max_diff([v.value for v in loaded.optimizer.variables], [v.value for v in model.optimizer.variables]) == 0
    for m in (model, loaded):
        m.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert max_diff(loaded.get_weights(), model.get_weights()) == 0
    assert int(loaded.optimizer.iterations.value) == 15
