"""Cost of one top-k mask selection: sorted `ops.top_k` vs `rigl_keras.selection.top_k_mask`.

For n = 1024², 2048², 4096² float32 scores and k = 10% of n, prints the
median of 3 timed runs (after one warm-up) of each, on one backend. On
TensorFlow both are run inside `tf.function(jit_compile=True)`, on JAX inside
`jax.jit` (with k passed as an int32 tensor, so a new k does not recompile);
torch runs eagerly. Each timing includes fetching the result to the host.

    python benchmarks/select_cost.py --backend {tensorflow,jax,torch} [--sizes 1024 2048 4096]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--backend", choices=["tensorflow", "jax", "torch"], default="tensorflow")
parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096], help="n = size²")
parser.add_argument("--fraction", type=float, default=0.1, help="k = fraction * n")
args = parser.parse_args()

os.environ["KERAS_BACKEND"] = args.backend
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from rigl_keras.selection import top_k_mask  # noqa: E402


def sorted_top_k(scores, k):
    return ops.top_k(scores, k, sorted=True)[1]


def compiled(fn, k_static: bool):
    """`fn(scores, k)` compiled the way the backend runs it fastest."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn, static_argnums=1) if k_static else jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    return fn


def median_seconds(fn, *fn_args, runs=3):
    ops.convert_to_numpy(fn(*fn_args))  # warm-up (and compile)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        ops.convert_to_numpy(fn(*fn_args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    backend = keras.backend.backend()
    baseline = compiled(sorted_top_k, k_static=True)  # top_k needs a static k
    ours = compiled(top_k_mask, k_static=False)
    rng = np.random.default_rng(0)
    print(f"backend: {backend} (keras {keras.__version__}), k = {args.fraction:g} n")
    print(f"{'n':>10} {'sorted top_k s':>15} {'top_k_mask s':>13} {'ratio':>7}")
    for size in args.sizes:
        n = size * size
        k = int(args.fraction * n)
        scores = ops.convert_to_tensor(rng.normal(size=n).astype("float32"))
        k_ours = k if backend == "torch" else ops.convert_to_tensor(k, "int32")
        mask = ops.convert_to_numpy(ours(scores, k_ours))
        assert int(mask.sum()) == k
        t_sorted = median_seconds(baseline, scores, k)
        t_ours = median_seconds(ours, scores, k_ours)
        print(f"{n:>10} {t_sorted:>15.3f} {t_ours:>13.3f} {t_sorted / t_ours:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
