"""Training-step time of LeNet-300-100 per method, as ratios to dense, on one backend.

Dense, static sparse (90%, no gradient capture), static sparse with gradient
capture, SET, RigL (ΔT = 100, gradients captured from the training step),
SNFS (its moving average moved by the training step, `capture_momentum`; and,
for comparison, updated by the callback after every batch from the captured
gradient) and gradual magnitude pruning are timed in one process, interleaved
round by round; the script prints each one's median (over rounds) of the time
per step within an epoch (callbacks' per-batch work, connectivity updates and
input included; epoch set-up and tear-down not), and its ratio to dense.
Absolute times depend on the machine; the ratios are what to compare.

    python benchmarks/step_time.py --backend {tensorflow,jax,torch} [--steps 300] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "--backend" in sys.argv:  # must be set before Keras is imported
    os.environ["KERAS_BACKEND"] = sys.argv[sys.argv.index("--backend") + 1]
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import rigl_keras as rk  # noqa: E402
from rigl_keras import baselines  # noqa: E402


def lenet_300_100() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(300, activation="relu"),
            keras.layers.Dense(100, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def compiled(model):
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


class StepClock:
    """Time per step inside an epoch: from the first callback's begin of the
    first batch to the last callback's end of the last batch, so it includes
    every callback's per-batch work, connectivity updates and fetching the
    batches.

    Epoch boundaries are left out: on TensorFlow, whole epochs of the same
    model take ~0.4 s longer at random, outside every step (setting up and
    tearing down the epoch's input pipeline).
    """

    def __init__(self):
        self.total = 0.0
        self.steps = 0
        clock = self

        class Start(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                if clock._first is None:
                    clock._first = time.perf_counter()

        class Stop(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                clock._last = time.perf_counter()
                clock.steps += 1

            def on_epoch_end(self, epoch, logs=None):
                clock.total += clock._last - clock._first

        self._first = self._last = None
        self.start, self.stop = Start(), Stop()

    def around(self, callbacks: list) -> list:
        """`callbacks` between the clock's start and stop callbacks."""
        return [self.start, *callbacks, self.stop]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs per configuration")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--delta_t", type=int, default=100)
    parser.add_argument("--backend", choices=("tensorflow", "jax", "torch"),
                        help="Keras backend (default: KERAS_BACKEND or Keras' default)")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    n = args.steps * args.batch_size
    x = rng.random((n, 784), dtype="float32")
    y = rng.integers(0, 10, n)
    total = (args.rounds + 1) * args.steps
    schedule = dict(delta_t=args.delta_t, end_step=total)

    def sparse(capture, momentum=False):
        model = rk.sparsify(lenet_300_100(), 0.9, "uniform", capture_gradients=capture)
        if momentum:
            rk.capture_momentum(model, 0.9)  # SNFS's moving average moved by the step
        return compiled(model)

    configs = {
        "dense": (compiled(lenet_300_100()), []),
        "static 90%": (sparse(False), []),
        "static+capture": (sparse(True), []),
        "SET": (sparse(False), [baselines.SETCallback(**schedule)]),
        "RigL": (sparse(True), [rk.RigLCallback(**schedule)]),
        "SNFS": (sparse(False, momentum=True), [baselines.SNFSCallback(**schedule)]),
        "SNFS (callback)": (sparse(True), [baselines.SNFSCallback(**schedule)]),
        "pruning": (
            compiled(rk.sparsify(lenet_300_100(), 0.0, "uniform", capture_gradients=False)),
            [baselines.MagnitudePruningCallback(0.9, 0, total, args.delta_t)],
        ),
    }
    times = {name: [] for name in configs}
    updates = {name: 0 for name in configs}
    # Round 0 traces the functions; rounds are interleaved so that machine
    # noise hits every configuration alike.
    for round_ in range(args.rounds + 1):
        for name, (model, callbacks) in configs.items():
            clock = StepClock()
            history = model.fit(x, y, batch_size=args.batch_size, epochs=round_ + 1,
                                initial_epoch=round_, verbose=0, callbacks=clock.around(callbacks))
            if round_ > 0:
                times[name].append(clock.total / clock.steps)
                updates[name] += int(history.history.get("mask_updates", [0])[-1])

    dense = statistics.median(times["dense"])
    print(f"LeNet-300-100, batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds, "
          f"backend {keras.backend.backend()}")
    print(f"{'configuration':<18} {'ms/step':>8} {'÷ dense':>8} {'mask updates':>13}")
    for name in configs:
        median = statistics.median(times[name])
        print(f"{name:<18} {1000 * median:>8.3f} {median / dense:>8.3f} {updates[name]:>13}")


if __name__ == "__main__":
    main()
