"""What masking and gradient capture cost a whole training step, on one backend.

Dense LeNet-300-100, the same model at 90% (uniform) without capture, and with
gradient capture (what RigL's update batches run), take training steps
(batch 100, SGD with momentum) interleaved one by one, in a new random order
every round: each model's step runs within milliseconds of the others, so a
slow stretch of the shared machine slows all of them alike. On PyTorch, the
masked model also runs as a sparse-training callback's `fit` runs it (the
optimizer's steps vouch that they keep the weights 0 outside the masks, so
the next forward pass skips its in-place AND over each weight), and through
the autograd function (the path of `torch.compile` and stateless calls)
instead of its in-place path. On PyTorch and TensorFlow, a model with
capture also runs with it paused, as the callbacks pause it between RigL
updates (on PyTorch, vouched for as well). Each step
is the backend's compiled (TensorFlow, JAX) or eager (PyTorch) training
function, as `fit` calls it, with no callback; printed: the median over
rounds of each step's time ÷ the dense step's of the same round.

`step_time.py` times every method inside `fit`, callbacks and updates
included, with whole epochs interleaved, which leaves more noise.

    python benchmarks/mask_cost.py --backend {tensorflow,jax,torch} [--steps 1500]
        [--distribution {uniform,erk}]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "--backend" in sys.argv:  # must be set before Keras is imported
    os.environ["KERAS_BACKEND"] = sys.argv[sys.argv.index("--backend") + 1]
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from step_time import compiled, lenet_300_100  # noqa: E402

import rigl_keras as rk  # noqa: E402
from rigl_keras import backend, callbacks, engine  # noqa: E402


def stepper(model, x, y):
    """One training step of `model` on (x, y), as `fit` runs it, returning
    once the step's work is done."""
    model.train_on_batch(x, y)  # builds and traces the step
    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        batches = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
        return lambda: float(model.train_function(batches)["loss"])
    if name == "torch":
        import torch

        data = [(torch.as_tensor(x), torch.as_tensor(y))]
        return lambda: model.train_function(data)
    import jax

    batch = (jax.numpy.asarray(x), jax.numpy.asarray(y), None)
    state = [model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                  optimizer_variables=True, metrics_variables=True,
                                  purge_model_variables=False)]

    def step():
        _, state[0] = model.train_function(state[0], iter([batch]))
        jax.block_until_ready(state[0])

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="steps of each model")
    parser.add_argument("--distribution", default="uniform", choices=("uniform", "erk"),
                        help="uniform keeps the first layer dense (paper §3(1)); erk masks all three")
    parser.add_argument("--backend", choices=("tensorflow", "jax", "torch"),
                        help="Keras backend (default: KERAS_BACKEND or Keras' default)")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((100, 784), dtype="float32")
    y = rng.integers(0, 10, 100)

    def keep_clean(model):
        # What a sparse-training callback's `on_train_begin` does on PyTorch
        # (nothing elsewhere): steps that keep the weights 0 outside their
        # masks say so, and the next forward pass skips its AND.
        callbacks._keep_clean_through_steps(model, model.optimizer,
                                            engine.optimizer_traits(model.optimizer))
        return model

    def sparse(capture):
        return compiled(rk.sparsify(lenet_300_100(), 0.9, args.distribution, capture_gradients=capture))

    models = {"dense": compiled(lenet_300_100()), "static 90%": sparse(False),
              "static 90% + capture": sparse(True)}
    if keras.backend.backend() == "torch":
        models["static 90%, in a callback's fit"] = keep_clean(sparse(False))
    if keras.backend.backend() != "jax":  # JAX's fit captures at every step
        paused = models["capture paused (RigL between updates)"] = keep_clean(sparse(True))
        paused.optimizer.build(paused.trainable_variables)  # with G, as the callbacks do
        rk.layers.pause_capture(rk.masked_weights(paused), True)
    if keras.backend.backend() == "torch":
        models["static 90%, autograd function"] = sparse(False)

    def in_place(name):
        backend._TORCH_IN_PLACE = name != "static 90%, autograd function"

    steps = {}
    for name, model in models.items():
        in_place(name)
        steps[name] = stepper(model, x, y)
        steps[name]()
    times = {name: [] for name in models}
    order = list(models)
    for _ in range(args.steps):
        random.shuffle(order)
        for name in order:
            in_place(name)
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    in_place(None)
    print(f"LeNet-300-100 ({args.distribution}), batch 100, {args.steps} steps of each, interleaved, backend "
          f"{keras.backend.backend()}, dense {1000 * statistics.median(times['dense']):.3f} ms/step")
    for name, seq in times.items():
        ratio = statistics.median(a / b for a, b in zip(seq, times["dense"]))
        print(f"{name:<38} {ratio:8.3f} × dense")


if __name__ == "__main__":
    main()
