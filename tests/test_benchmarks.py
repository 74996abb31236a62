"""The step-time benchmark's clock and estimators, on hand-computed cases."""

import importlib.util
import os

import keras
import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "step_time.py")


@pytest.fixture(scope="module")
def step_time():
    spec = importlib.util.spec_from_file_location("step_time", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ratios_by_hand(step_time):
    dense, masked = step_time.StepClock(), step_time.StepClock()
    dense.rounds = [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    masked.rounds = [[1.1, 1.1, 1.1], [2.4, 2.4, 2.4]]
    masked.updates = [3.1]
    # Pooled medians 1.75 and 1.5; the update step's excess 3.1 - 1.75 over
    # 7 steps; per-round ratios 1.1 and 1.2; means 13.6/7 and 9/6.
    share = (3.1 - 1.75) / 7
    paired, median, mean = masked.ratio_to(dense)
    assert paired == pytest.approx(1.15 + share / 1.5)
    assert median == pytest.approx((1.75 + share) / 1.5)
    assert mean == pytest.approx((13.6 / 7) / 1.5)
    assert dense.ratio_to(dense) == pytest.approx((1.0, 1.0, 1.0))


def test_clock_times_every_step_and_tells_update_steps(step_time):
    class Update(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                logs["connections_changed"] = 0

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    x, y = np.zeros((20, 4), "float32"), np.zeros((20, 2), "float32")
    clock = step_time.StepClock()
    for epoch in range(2):
        model.fit(x, y, batch_size=4, epochs=epoch + 1, initial_epoch=epoch, verbose=0,
                  callbacks=clock.around([Update()]))
    assert [len(r) for r in clock.rounds] == [4, 4]
    assert len(clock.updates) == 2
    assert all(t > 0 for r in clock.rounds for t in r) and all(t > 0 for t in clock.updates)


def test_mask_cost_steps_train_one_batch_each():
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "mask_cost.py")
    spec = importlib.util.spec_from_file_location("mask_cost", path)
    mask_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mask_cost)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    x, y = np.ones((8, 4), "float32"), np.ones((8, 2), "float32")
    step = mask_cost.stepper(model, x, y)  # trains one batch, building the step
    step()
    step()
    if keras.backend.backend() != "jax":  # JAX's steps move a state outside the model
        assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 3
