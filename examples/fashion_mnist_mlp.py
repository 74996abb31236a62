r"""LeNet-300-100 on Fashion-MNIST with RigL or any baseline of the paper.

Trains one configuration, prints the test accuracy, the measured sparsity
and the inference/training FLOPs relative to the dense model, and writes
results.json to --output_dir.

    python examples/fashion_mnist_mlp.py --method=rigl --sparsity=0.9 \
        --epochs=20 --output_dir=/tmp/mlp_rigl

The official MNIST regime (rigl/mnist/mnist_train_eval.py: 200 epochs, lr 0.2
÷3 at epochs 75 and 95, T_end = step 50000, fc1 at S, fc2 at 0.9·S, output
layer dense, pruning from step 2000 to 30000 every 500; see
`fashion_mnist.official_mnist_preset`), flags given explicitly winning:

    python examples/fashion_mnist_mlp.py --preset=official_mnist \
        --method=rigl --sparsity=0.98 --output_dir=/tmp/mlp_official

Data: real Fashion-MNIST, offline (see examples/data.py): --data_dir, a
prepared TFDS copy, or Debian's `dataset-fashion-mnist` package.
"""

from __future__ import annotations

import dataclasses
import sys

if __name__ == "__main__":  # `python examples/fashion_mnist_mlp.py` from anywhere
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from examples import common
from examples import fashion_mnist

Config = fashion_mnist.Config
lenet_300_100 = fashion_mnist.lenet_300_100


def define_flags(flag_values=flags.FLAGS) -> None:
    """Defines this script's flags (only when it runs as a program)."""
    fashion_mnist.define_flags(flag_values, model="mlp")
    common.declare_main_key_flags(flag_values)


def run(config: Config | None = None, data=None, **overrides) -> dict:
    """Trains and evaluates LeNet-300-100 for one configuration.

    Args:
      config: a `Config` (model is forced to "mlp"); None uses the defaults.
      data: preloaded `examples.data.ArrayData`, or None to load it.
      **overrides: `Config` fields to change, e.g. method="set", epochs=1.

    Returns:
      The results dict (see `fashion_mnist.train_and_evaluate`).
    """
    config = dataclasses.replace(config or Config(), model="mlp", **overrides)
    return fashion_mnist.train_and_evaluate(config, data)


def main(argv):
    del argv  # unused
    common.run_and_report(Config, run, make_config=fashion_mnist.config_from_flags)


if __name__ == "__main__":
    define_flags()
    app.run(main)
