"""Training-step time of LeNet-300-100 per method, as ratios to dense, on one backend.

Dense, static sparse (90%, no gradient capture; with `StaticCallback`, and
the same masked model without any callback: on PyTorch a callback lets
optimizer steps skip one in-place AND per weight), static sparse with gradient
capture, SET, RigL (ΔT = 100, gradients captured from the training step),
SNFS (its moving average moved by the training step, `capture_momentum`; and,
for comparison, updated by the callback after every batch from the captured
gradient) and gradual magnitude pruning train in one process, one short epoch
each per round, in a new random order every round. Every step is timed (from
the end of the step before: fetching the batch, callbacks' per-batch work and
connectivity updates included; epoch set-up and tear-down not).

The machine this project runs on is shared: other work slows whole stretches
of steps, by up to 2x. So the ratio printed first is the median over rounds of
each round's median step ÷ dense's median step of the same round, plus the
update steps' median excess, spread over all steps; the ratios of pooled
medians and of plain means follow, for comparison, and then the number of
update steps and an update step's median excess over the other steps, in
dense steps. Absolute times depend on the machine; the ratios are what to
compare.

    python benchmarks/step_time.py --backend {tensorflow,jax,torch} [--steps 25] [--rounds 60]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings

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
    """The duration of every training step, from the end of the one before
    (the first: from its begin) to the last callback's end of this one: it
    includes fetching the batch, every callback's per-batch work and
    connectivity updates. Steps after which a callback logged
    `connections_changed` are update steps.

    Epoch boundaries are left out: on TensorFlow, whole epochs of the same
    model take ~0.4 s longer at random, outside every step (setting up and
    tearing down the epoch's input pipeline).
    """

    def __init__(self):
        self.rounds: list[list[float]] = []  # per fit: durations of the other steps
        self.updates: list[float] = []  # durations of update steps
        self._last = None
        clock = self

        class Start(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                if clock._last is None:
                    clock._last = time.perf_counter()
                    clock.rounds.append([])

        class Stop(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                now = time.perf_counter()
                update = "connections_changed" in (logs or {})
                (clock.updates if update else clock.rounds[-1]).append(now - clock._last)
                clock._last = now

            def on_epoch_end(self, epoch, logs=None):
                clock._last = None

        self.start, self.stop = Start(), Stop()

    def around(self, callbacks: list) -> list:
        """`callbacks` between the clock's start and stop callbacks."""
        return [self.start, *callbacks, self.stop]

    def steps(self) -> list[float]:
        """The durations of all rounds' steps that did not update."""
        return [t for r in self.rounds for t in r]

    def ratio_to(self, dense: StepClock) -> tuple[float, float, float]:
        """This configuration's step cost ÷ dense's, estimated three ways.

        Returns:
          (paired, median, mean). `paired`: the median over rounds of the
          ratio of this round's median step to dense's median step of the
          same round, plus the update steps' median excess over this
          configuration's median step, ÷ dense's, times the fraction of steps
          that update. `median`: the same from the medians of all rounds'
          steps pooled. `mean`: the ratio of plain means over all steps.
        """
        steps, dense_steps = self.steps(), dense.steps()
        typical, dense_typical = statistics.median(steps), statistics.median(dense_steps)
        n = len(steps) + len(self.updates)
        update_share = 0.0
        if self.updates:
            update_share = (statistics.median(self.updates) - typical) * len(self.updates) / n
        paired = statistics.median(statistics.median(mine) / statistics.median(theirs)
                                   for mine, theirs in zip(self.rounds, dense.rounds))
        mean = (sum(steps) + sum(self.updates)) / n
        return (paired + update_share / dense_typical,
                (typical + update_share) / dense_typical,
                mean / (sum(dense_steps) / len(dense_steps)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25, help="steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=60, help="timed epochs per configuration")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--delta_t", type=int, default=100)
    parser.add_argument("--backend", choices=("tensorflow", "jax", "torch"),
                        help="Keras backend (default: KERAS_BACKEND or Keras' default)")
    args = parser.parse_args()

    # Short epochs: most fits have no update step, and the callbacks say so.
    warnings.filterwarnings("ignore", message=".*no connectivity update will happen in this fit")
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
        "static 90%": (sparse(False), [baselines.StaticCallback()]),
        "masked, no callback": (sparse(False), []),
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
    clocks = {name: StepClock() for name in configs}
    order = list(configs)
    for round_ in range(args.rounds + 1):
        # A new order every round: no configuration always follows the same
        # one (or the collection of its garbage).
        rng.shuffle(order)
        for name in order:
            model, callbacks = configs[name]
            clock = clocks[name] if round_ > 0 else StepClock()  # round 0 traces
            gc.collect()
            model.fit(x, y, batch_size=args.batch_size, epochs=round_ + 1, initial_epoch=round_,
                      verbose=0, callbacks=clock.around(callbacks))

    dense = clocks["dense"]
    print(f"LeNet-300-100, batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds, "
          f"backend {keras.backend.backend()}, dense "
          f"{1000 * statistics.median(dense.steps()):.3f} ms/step")
    print(f"{'configuration':<18} {'÷ dense':>8} {'pooled':>8} {'mean':>8} {'updates':>8} "
          f"{'update':>8}")
    dense_step = statistics.median(dense.steps())
    for name, clock in clocks.items():
        paired, median, mean = clock.ratio_to(dense)
        # An update step's median excess over this configuration's other
        # steps, in dense steps.
        update = (statistics.median(clock.updates) - statistics.median(clock.steps())) / dense_step \
            if clock.updates else 0.0
        print(f"{name:<18} {paired:>8.3f} {median:>8.3f} {mean:>8.3f} {len(clock.updates):>8} "
              f"{update:>8.2f}")


if __name__ == "__main__":
    main()
