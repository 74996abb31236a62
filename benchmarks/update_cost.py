"""Cost of one RigL mask update in training steps, for large Dense layers, on one backend.

For each size n (3 Dense layers of n × n at S = 0.9, batch 128), one
process builds the sparse model, trains it, and times (median of `--repeats`)
one training step and one RigL update (`RigLCallback.update`: captured
gradients, drop/grow selection, mask and optimizer-state commit) on the same
model, then prints update ÷ step. With `--memory`, it also reports, for one
update of the largest size, the peak of the NumPy temporaries it allocates
(`tracemalloc`; on CPU the whole selection and commit run in NumPy) in units
of one float32 kernel, and how much the process's peak resident memory grew
(Linux `ru_maxrss`).

    python benchmarks/update_cost.py --backend {tensorflow,jax,torch} [--sizes 1024 2048 4096]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
import tracemalloc

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "--backend" in sys.argv:  # must be set before Keras is imported
    os.environ["KERAS_BACKEND"] = sys.argv[sys.argv.index("--backend") + 1]
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import rigl_keras as rk  # noqa: E402


def build(n: int) -> keras.Model:
    return keras.Sequential(
        [keras.Input((n,))] + [keras.layers.Dense(n, name=f"fc{i}") for i in range(3)]
    )


def measure(n: int, batch: int, repeats: int) -> tuple[float, float]:
    model = rk.sparsify(build(n), 0.9, "erk")  # equal square layers: 0.9 each
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "mse")
    rng = np.random.default_rng(0)
    x = rng.random((batch * (repeats + 2), n), dtype="float32")
    y = rng.random((batch * (repeats + 2), n), dtype="float32")
    rigl = rk.RigLCallback(delta_t=10**9, end_step=10**9 + 1)
    model.fit(x[:batch], y[:batch], batch_size=batch, epochs=1, verbose=0, callbacks=[rigl])
    steps = []
    for i in range(repeats):
        start = time.perf_counter()
        model.train_on_batch(x[batch * i:batch * (i + 1)], y[batch * i:batch * (i + 1)])
        keras.ops.convert_to_numpy(model.optimizer.iterations)
        steps.append(time.perf_counter() - start)
    rigl.update(100)  # warm-up: traces/compiles the selection for these shapes
    updates = []
    for i in range(repeats):
        start = time.perf_counter()
        rigl.update(100 + i)
        updates.append(time.perf_counter() - start)
    return statistics.median(steps), statistics.median(updates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("tensorflow", "jax", "torch"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="report peak memory of one update")
    args = parser.parse_args()
    print(f"3 x Dense n x n, S = 0.9, batch {args.batch_size}, backend {keras.backend.backend()}")
    print(f"{'n':>6} {'step s':>8} {'update s':>9} {'update ÷ step':>14}")
    for n in args.sizes:
        step, update = measure(n, args.batch_size, args.repeats)
        print(f"{n:>6} {step:>8.3f} {update:>9.3f} {update / step:>14.2f}")
    if args.memory:
        n = max(args.sizes)
        model = rk.sparsify(build(n), 0.9, "erk")
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "mse")
        rigl = rk.RigLCallback(delta_t=10**9, end_step=10**9 + 1)
        data = np.random.default_rng(0).random((args.batch_size, n), dtype="float32")
        model.fit(data, data[:, ::-1], batch_size=args.batch_size, verbose=0, callbacks=[rigl])
        rigl.update(100)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()
        rigl.update(101)
        _, host_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kernel = n * n * 4 / 2**20
        print(f"one update at n={n}: peak of its NumPy temporaries {host_peak / 2**20:.1f} MiB "
              f"= {host_peak / 2**20 / kernel:.2f} float32 kernels of {kernel:.0f} MiB; "
              f"process peak RSS grew by {(after - before) / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
