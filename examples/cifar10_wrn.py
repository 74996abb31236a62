r"""WRN-22-2 on CIFAR-10 with RigL or any baseline, with the official hyperparameters.

Batch 128, SGD with Nesterov momentum 0.9, learning rate 0.1 divided by 5
at steps 30k, 60k and 90k, weight decay 5e-4 on every kernel, 97,656 steps
(250 epochs), connectivity updates every ΔT = 100 steps until T_end = 75k
(α = 0.3, cosine); magnitude pruning from step 20k to 75k every 1k steps.
The training multiplier --multiplier (M) scales every one of those steps.

    python examples/cifar10_wrn.py --method=rigl --sparsity=0.9 \
        --distribution=erk --output_dir=/tmp/wrn_rigl

Data comes from TFDS (`cifar10`; downloaded on first use with network
access, or give --tfds_data_dir). --max_steps stops early (keeping the full
schedules), and --train_steps/--end_step/--lr_drop_steps shrink the
schedules themselves, e.g. for a smoke test.
"""

from __future__ import annotations

import dataclasses
import math
import sys

if __name__ == "__main__":  # `python examples/cifar10_wrn.py` from anywhere
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras
from absl import app, flags

from examples import common
from examples import data as data_lib

__all__ = ["Config", "wide_resnet", "schedule_steps", "run", "define_flags"]

CIFAR10_TRAIN_EXAMPLES = 50000


@dataclasses.dataclass
class Config:
    """One CIFAR-10 run. Step counts are at M = 1; fields mirror the flags."""

    method: str = "rigl"
    sparsity: float = 0.9
    distribution: str = "erk"
    delta_t: int = 100
    alpha: float = 0.3
    decay: str = "cosine"
    multiplier: float = 1.0
    seed: int = 0
    output_dir: str | None = None
    batch_size: int = 128
    learning_rate: float = 0.1
    lr_drop_steps: tuple[int, ...] = (30000, 60000, 90000)
    lr_drop_factor: float = 0.2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    train_steps: int = 97656
    end_step: int = 75000
    prune_begin_step: int = 20000
    prune_end_step: int = 75000
    prune_frequency: int = 1000
    max_steps: int = 0
    steps_per_epoch: int = 0
    wrn_depth: int = 22
    wrn_width: int = 2
    image_size: int = 32
    strategy: str = "default"
    tfds_data_dir: str | None = None
    download: bool = True
    train_limit: int = 0
    test_limit: int = 0
    verbose: int = 2


def wide_resnet(depth: int = 22, width_factor: int = 2, width: float = 1.0, *,
                num_classes: int = 10, image_size: int = 32,
                weight_decay: float = 5e-4) -> keras.Model:
    """A pre-activation Wide ResNet WRN-depth-width_factor (Zagoruyko & Komodakis).

    Three groups of (depth − 4) / 6 residual blocks with 16k, 32k and 64k
    filters (k = width_factor) after a 16-filter 3×3 stem; each block is
    BN-ReLU-conv3×3-BN-ReLU-conv3×3 with a 1×1 projection shortcut where the
    shape changes. Convolutions have no bias; every kernel gets the L2
    penalty weight_decay/2 · Σw², i.e. gradient weight_decay · w, the
    convention of TF's l2_regularizer that the official code uses.

    Args:
      depth: 6n + 4 (22 → 3 blocks per group).
      width_factor: k.
      width: extra multiplier of every filter count (Small-Dense uses < 1).
      num_classes: output units.
      image_size: input side.
      weight_decay: the weight decay coefficient.

    Raises:
      ValueError: if depth is not 6n + 4 with n >= 1.
    """
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n + 4 with n >= 1; got {depth}.")
    blocks = (depth - 4) // 6
    regularizer = keras.regularizers.L2(weight_decay / 2) if weight_decay else None

    def scaled(filters):
        return max(1, round(filters * width))

    def conv(filters, size, stride, name):
        return keras.layers.Conv2D(
            filters, size, strides=stride, padding="same", use_bias=False,
            kernel_initializer="he_normal", kernel_regularizer=regularizer, name=name)

    def bn_relu(x, name):
        x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name + "_bn")(x)
        return keras.layers.ReLU(name=name + "_relu")(x)

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = conv(scaled(16), 3, 1, "stem_conv")(inputs)
    for group, base in enumerate((16, 32, 64), start=1):
        filters = scaled(base * width_factor)
        for block in range(1, blocks + 1):
            name = f"group{group}_block{block}"
            stride = 2 if (group > 1 and block == 1) else 1
            pre = bn_relu(x, name + "_pre")
            if stride != 1 or x.shape[-1] != filters:
                shortcut = conv(filters, 1, stride, name + "_shortcut")(pre)
            else:
                shortcut = x
            y = conv(filters, 3, stride, name + "_conv1")(pre)
            y = bn_relu(y, name + "_mid")
            y = conv(filters, 3, 1, name + "_conv2")(y)
            x = keras.layers.Add(name=name + "_add")([shortcut, y])
    x = bn_relu(x, "final")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, kernel_regularizer=regularizer, name="logits")(x)
    return keras.Model(inputs, outputs, name=f"wrn_{depth}_{width_factor}")


def define_flags(flag_values=flags.FLAGS) -> None:
    """Defines this script's flags (only when it runs as a program)."""
    d = Config()
    fv = flag_values
    common.define_method_flags(fv, method=d.method, sparsity=d.sparsity,
                               distribution=d.distribution)
    flags.DEFINE_integer("batch_size", d.batch_size, "Global batch size.", flag_values=fv)
    flags.DEFINE_float("learning_rate", d.learning_rate, "Initial learning rate.",
                       flag_values=fv)
    flags.DEFINE_list("lr_drop_steps", [str(s) for s in d.lr_drop_steps],
                      "Steps (at M = 1) where the learning rate is multiplied by "
                      "--lr_drop_factor.", flag_values=fv)
    flags.DEFINE_float("lr_drop_factor", d.lr_drop_factor, "Learning-rate drop factor.",
                       flag_values=fv)
    flags.DEFINE_float("momentum", d.momentum, "SGD momentum.", flag_values=fv)
    flags.DEFINE_bool("nesterov", d.nesterov, "Nesterov momentum.", flag_values=fv)
    flags.DEFINE_float("weight_decay", d.weight_decay, "Weight decay of every kernel.",
                       flag_values=fv)
    flags.DEFINE_integer("train_steps", d.train_steps, "Training steps at M = 1.",
                         flag_values=fv)
    flags.DEFINE_integer("end_step", d.end_step, "T_end at M = 1.", flag_values=fv)
    flags.DEFINE_integer("prune_begin_step", d.prune_begin_step,
                         "prune: first pruning step at M = 1.", flag_values=fv)
    flags.DEFINE_integer("prune_end_step", d.prune_end_step,
                         "prune: last pruning step at M = 1.", flag_values=fv)
    flags.DEFINE_integer("prune_frequency", d.prune_frequency,
                         "prune: steps between pruning events.", flag_values=fv)
    flags.DEFINE_integer("max_steps", d.max_steps,
                         "Stop after this many steps, schedules unchanged (0: full run).",
                         flag_values=fv)
    flags.DEFINE_integer("steps_per_epoch", d.steps_per_epoch,
                         "Steps per Keras epoch (logging); 0: one pass over the data.",
                         flag_values=fv)
    flags.DEFINE_integer("wrn_depth", d.wrn_depth, "WRN depth (6n + 4).", flag_values=fv)
    flags.DEFINE_integer("wrn_width", d.wrn_width, "WRN width factor k.", flag_values=fv)
    flags.DEFINE_integer("image_size", d.image_size,
                         "Input side; images are resized if not 32.", flag_values=fv)
    flags.DEFINE_enum("strategy", d.strategy, common.STRATEGIES,
                      "tf.distribute strategy.", flag_values=fv)
    flags.DEFINE_string("tfds_data_dir", d.tfds_data_dir, "TFDS data directory.",
                        flag_values=fv)
    flags.DEFINE_bool("download", d.download, "Let TFDS download CIFAR-10 if needed.",
                      flag_values=fv)
    flags.DEFINE_integer("train_limit", d.train_limit, "First N training images (0: all).",
                         flag_values=fv)
    flags.DEFINE_integer("test_limit", d.test_limit, "First N test images (0: all).",
                         flag_values=fv)
    flags.DEFINE_integer("verbose", d.verbose, "Keras fit verbosity.", flag_values=fv)
    common.declare_main_key_flags(flag_values)


def schedule_steps(config: Config) -> dict:
    """Every step count of the run, scaled by M.

    Returns:
      {"total", "run", "end", "prune_begin", "prune_end", "boundaries"} in
      optimizer steps; "run" is "total" cut at --max_steps.
    """
    m = config.multiplier
    total = max(1, common.scaled_step(config.train_steps, m))
    prune_begin = common.scaled_step(config.prune_begin_step, m)
    return {
        "total": total,
        "run": min(total, config.max_steps) if config.max_steps else total,
        "end": max(1, common.scaled_step(config.end_step, m)),
        "prune_begin": prune_begin,
        "prune_end": max(prune_begin + 1, common.scaled_step(config.prune_end_step, m)),
        "boundaries": [common.scaled_step(s, m) for s in common.parse_ints(config.lr_drop_steps)],
    }


def run(config: Config | None = None, **overrides) -> dict:
    """Trains WRN on CIFAR-10 for one configuration and evaluates it on the test set.

    Args:
      config: a `Config`; None uses the defaults.
      **overrides: `Config` fields to change.

    Returns:
      The results dict (also written to config.output_dir/results.json).
    """
    config = dataclasses.replace(config or Config(), **overrides)
    config.lr_drop_steps = common.parse_ints(config.lr_drop_steps)
    timer = common.Timer()
    common.set_seed(config.seed)
    steps = schedule_steps(config)
    total_steps, run_steps, end_step = steps["total"], steps["run"], steps["end"]
    prune_begin, prune_end = steps["prune_begin"], steps["prune_end"]
    boundaries = steps["boundaries"]

    strategy = common.get_strategy(config.strategy)
    train_ds, test_ds = data_lib.cifar10_datasets(
        config.batch_size, data_dir=config.tfds_data_dir, download=config.download,
        image_size=config.image_size, train_limit=config.train_limit,
        test_limit=config.test_limit, seed=config.seed,
    )
    examples = config.train_limit or CIFAR10_TRAIN_EXAMPLES
    steps_per_epoch = config.steps_per_epoch or math.ceil(examples / config.batch_size)

    def build_fn(width: float) -> keras.Model:
        return wide_resnet(config.wrn_depth, config.wrn_width, width,
                           image_size=config.image_size, weight_decay=config.weight_decay)

    with strategy.scope():
        model, callbacks, method = common.build_method(
            config, build_fn, end_step=end_step,
            prune_begin_step=prune_begin, prune_end_step=prune_end,
            prune_frequency=config.prune_frequency,
        )
        dense_model = build_fn(1.0) if config.method == "small_dense" else None
        values = [config.learning_rate * config.lr_drop_factor**i
                  for i in range(len(boundaries) + 1)]
        learning_rate = (keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
                         if boundaries else config.learning_rate)
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate, momentum=config.momentum,
                                           nesterov=config.nesterov),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    model.fit(
        train_ds,
        epochs=common.fit_epochs(run_steps, steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        callbacks=callbacks + [common.StopAtStep(run_steps)],
        shuffle=False,  # the dataset shuffles itself
        verbose=config.verbose,
    )
    test_loss, test_accuracy = model.evaluate(test_ds, verbose=0)
    results = common.collect_results(
        config, model, config.method, script="cifar10_wrn", dense_model=dense_model,
        test_loss=test_loss, test_accuracy=test_accuracy, total_steps=total_steps,
        pruning_schedule=common.pruning_schedule_for(
            config.method, prune_begin, prune_end, config.prune_frequency),
        epochs=run_steps * config.batch_size / examples,
        data_source="tfds:cifar10", timer=timer,
        extra={"model": model.name, "end_step": end_step, "learning_rate": config.learning_rate,
               "strategy": config.strategy},
    )
    common.write_results(config.output_dir, results)
    return results


def main(argv):
    del argv  # unused
    common.run_and_report(Config, run)


if __name__ == "__main__":
    define_flags()
    app.run(main)
