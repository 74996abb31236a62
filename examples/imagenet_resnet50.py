r"""ResNet-50 on ImageNet-2012 with RigL or any baseline, with the paper's recipe.

Batch 4096, SGD with Nesterov momentum 0.9 (as the official code), learning rate 1.6 (scaled linearly with
the batch size) reached by a linear warm-up over 5 epochs and divided by 10
at epochs 30, 70 and 90, label smoothing 0.1, weight decay 1e-4, random
crops and flips, 32k steps (~100 epochs), connectivity updates every
ΔT = 100 steps until T_end = 25k (α = 0.3, cosine); magnitude pruning from
step 10k to 25k every 1k steps. Step counts are given at batch 4096 and
rescaled for other batch sizes; the training multiplier --multiplier (M)
scales steps, learning-rate epochs and every connectivity schedule.

    python examples/imagenet_resnet50.py --method=rigl --sparsity=0.8 \
        --distribution=uniform --strategy=mirrored --output_dir=/tmp/rn50_rigl

Data comes from TFDS (`imagenet2012`), which must be prepared beforehand
from the manually downloaded archives (--tfds_data_dir). --image_size,
--batch_size, --resnet_blocks, --resnet_width and --max_steps shrink a run
for smoke tests.
"""

from __future__ import annotations

import dataclasses
import math
import sys

if __name__ == "__main__":  # `python examples/imagenet_resnet50.py` from anywhere
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras
from absl import app, flags
from keras import ops

from examples import common
from examples import data as data_lib

__all__ = ["Config", "resnet", "WarmupStepDecay", "schedule_steps", "run", "define_flags"]

#: The paper's batch size; step defaults below are for it.
REFERENCE_BATCH = 4096


@dataclasses.dataclass
class Config:
    """One ImageNet run. Fields mirror the flags; 0 means "the paper's value"."""

    method: str = "rigl"
    sparsity: float = 0.8
    distribution: str = "uniform"
    delta_t: int = 100
    alpha: float = 0.3
    decay: str = "cosine"
    multiplier: float = 1.0
    seed: int = 0
    output_dir: str | None = None
    batch_size: int = 4096
    learning_rate: float = 1.6
    scale_learning_rate: bool = True
    warmup_epochs: float = 5.0
    lr_drop_epochs: tuple[float, ...] = (30.0, 70.0, 90.0)
    lr_drop_factor: float = 0.1
    label_smoothing: float = 0.1
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = True  # the official imagenet_resnet training uses Nesterov momentum
    train_steps: int = 0
    end_step: int = 0
    prune_begin_step: int = 0
    prune_end_step: int = 0
    prune_frequency: int = 0
    max_steps: int = 0
    num_train_examples: int = data_lib.IMAGENET_TRAIN_EXAMPLES
    image_size: int = 224
    num_classes: int = 1000
    resnet_blocks: tuple[int, ...] = (3, 4, 6, 3)
    resnet_width: float = 1.0
    strategy: str = "default"
    tpu: str | None = None
    tfds_data_dir: str | None = None
    download: bool = False
    train_limit: int = 0
    test_limit: int = 0
    verbose: int = 2


def resnet(blocks=(3, 4, 6, 3), width: float = 1.0, *, num_classes: int = 1000,
           image_size: int = 224, weight_decay: float = 1e-4) -> keras.Model:
    """A bottleneck ResNet (ResNet-50 by default; v1.5: stride on the 3×3 conv).

    Args:
      blocks: bottleneck blocks per stage ((3, 4, 6, 3) is ResNet-50).
      width: multiplier of every channel count (Small-Dense uses < 1).
      num_classes: output units.
      image_size: input side.
      weight_decay: weight decay coefficient; each kernel gets the L2 penalty
        weight_decay/2 · Σw² (gradient weight_decay · w, as TF's l2_loss).
    """
    regularizer = keras.regularizers.L2(weight_decay / 2) if weight_decay else None

    def scaled(channels):
        return max(1, round(channels * width))

    def conv(x, filters, size, stride, name):
        return keras.layers.Conv2D(
            filters, size, strides=stride, padding="same", use_bias=False,
            kernel_initializer="he_normal", kernel_regularizer=regularizer, name=name)(x)

    def bn(x, name):
        return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)(x)

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = keras.layers.ReLU(name="conv1_relu")(bn(conv(inputs, scaled(64), 7, 2, "conv1"),
                                                "conv1_bn"))
    x = keras.layers.MaxPooling2D(3, 2, padding="same", name="pool1")(x)
    for stage, (count, base) in enumerate(zip(blocks, (64, 128, 256, 512)), start=2):
        filters, out = scaled(base), scaled(4 * base)
        for block in range(1, count + 1):
            name = f"conv{stage}_block{block}"
            stride = 2 if (block == 1 and stage > 2) else 1
            shortcut = x
            if block == 1:
                shortcut = bn(conv(x, out, 1, stride, name + "_proj"), name + "_proj_bn")
            y = keras.layers.ReLU()(bn(conv(x, filters, 1, 1, name + "_1"), name + "_1_bn"))
            y = keras.layers.ReLU()(bn(conv(y, filters, 3, stride, name + "_2"), name + "_2_bn"))
            y = bn(conv(y, out, 1, 1, name + "_3"), name + "_3_bn")
            x = keras.layers.ReLU(name=name + "_out")(keras.layers.Add()([shortcut, y]))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, kernel_regularizer=regularizer, name="logits")(x)
    depth = 2 + 3 * sum(blocks)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")


@keras.saving.register_keras_serializable(package="rigl_keras_examples")
class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then ×`factor` at each boundary.

    Args:
      peak: the learning rate reached at the end of the warm-up.
      warmup_steps: steps of the linear warm-up (0: none).
      boundaries: steps at which the rate is multiplied by `factor`.
      factor: the drop factor (0.1 in the paper).
    """

    def __init__(self, peak, warmup_steps, boundaries, factor):
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.boundaries = [int(b) for b in boundaries]
        self.factor = float(factor)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        drops = ops.zeros((), "float32")
        for boundary in self.boundaries:
            drops = drops + ops.cast(step >= boundary, "float32")
        decayed = self.peak * ops.power(self.factor, drops)
        if self.warmup_steps <= 0:
            return decayed
        warm = self.peak * step / float(self.warmup_steps)
        return ops.where(step < self.warmup_steps, warm, decayed)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "boundaries": self.boundaries, "factor": self.factor}


def define_flags(flag_values=flags.FLAGS) -> None:
    """Defines this script's flags (only when it runs as a program)."""
    d = Config()
    fv = flag_values
    common.define_method_flags(fv, method=d.method, sparsity=d.sparsity,
                               distribution=d.distribution)
    flags.DEFINE_integer("batch_size", d.batch_size, "Global batch size.", flag_values=fv)
    flags.DEFINE_float("learning_rate", d.learning_rate,
                       "Peak learning rate at batch 4096.", flag_values=fv)
    flags.DEFINE_bool("scale_learning_rate", d.scale_learning_rate,
                      "Scale the learning rate by batch_size / 4096.", flag_values=fv)
    flags.DEFINE_float("warmup_epochs", d.warmup_epochs, "Linear warm-up epochs.",
                       flag_values=fv)
    flags.DEFINE_list("lr_drop_epochs", [f"{e:g}" for e in d.lr_drop_epochs],
                      "Epochs (at M = 1) where the learning rate drops.", flag_values=fv)
    flags.DEFINE_float("lr_drop_factor", d.lr_drop_factor, "Learning-rate drop factor.",
                       flag_values=fv)
    flags.DEFINE_float("label_smoothing", d.label_smoothing, "Label smoothing.", flag_values=fv)
    flags.DEFINE_float("weight_decay", d.weight_decay, "Weight decay of every kernel.",
                       flag_values=fv)
    flags.DEFINE_float("momentum", d.momentum, "SGD momentum.", flag_values=fv)
    flags.DEFINE_bool("nesterov", d.nesterov, "Nesterov momentum.", flag_values=fv)
    flags.DEFINE_integer("train_steps", d.train_steps,
                         "Training steps at M = 1 (0: 32000 × 4096 / batch_size).",
                         flag_values=fv)
    flags.DEFINE_integer("end_step", d.end_step,
                         "T_end at M = 1 (0: 25000 × 4096 / batch_size).", flag_values=fv)
    flags.DEFINE_integer("prune_begin_step", d.prune_begin_step,
                         "prune: first pruning step at M = 1 (0: 10/32 of the steps).",
                         flag_values=fv)
    flags.DEFINE_integer("prune_end_step", d.prune_end_step,
                         "prune: last pruning step at M = 1 (0: 25/32 of the steps).",
                         flag_values=fv)
    flags.DEFINE_integer("prune_frequency", d.prune_frequency,
                         "prune: steps between pruning events (0: 1/32 of the steps).",
                         flag_values=fv)
    flags.DEFINE_integer("max_steps", d.max_steps,
                         "Stop after this many steps, schedules unchanged (0: full run).",
                         flag_values=fv)
    flags.DEFINE_integer("num_train_examples", d.num_train_examples,
                         "Training-set size (defines an epoch).", flag_values=fv)
    flags.DEFINE_integer("image_size", d.image_size, "Input side.", flag_values=fv)
    flags.DEFINE_integer("num_classes", d.num_classes, "Classes.", flag_values=fv)
    flags.DEFINE_list("resnet_blocks", [str(b) for b in d.resnet_blocks],
                      "Bottleneck blocks per stage (3,4,6,3: ResNet-50).", flag_values=fv)
    flags.DEFINE_float("resnet_width", d.resnet_width, "Channel multiplier.", flag_values=fv)
    flags.DEFINE_enum("strategy", d.strategy, common.STRATEGIES,
                      "tf.distribute strategy.", flag_values=fv)
    flags.DEFINE_string("tpu", d.tpu, "TPU name or address for --strategy=tpu.",
                        flag_values=fv)
    flags.DEFINE_string("tfds_data_dir", d.tfds_data_dir, "TFDS data directory.",
                        flag_values=fv)
    flags.DEFINE_bool("download", d.download,
                      "Let TFDS prepare imagenet2012 from its manual directory.", flag_values=fv)
    flags.DEFINE_integer("train_limit", d.train_limit, "First N training images (0: all).",
                         flag_values=fv)
    flags.DEFINE_integer("test_limit", d.test_limit, "First N validation images (0: all).",
                         flag_values=fv)
    flags.DEFINE_integer("verbose", d.verbose, "Keras fit verbosity.", flag_values=fv)
    common.declare_main_key_flags(flag_values)


def schedule_steps(config: Config) -> dict:
    """Every step count of the run, at the configured batch size and M.

    Returns:
      {"total", "end", "prune_begin", "prune_end", "prune_frequency",
      "steps_per_epoch", "warmup", "boundaries"} in optimizer steps.
    """
    per_batch = REFERENCE_BATCH / config.batch_size
    m = config.multiplier
    train_steps = config.train_steps or round(32000 * per_batch)
    total = max(1, common.scaled_step(train_steps, m))
    steps_per_epoch = config.num_train_examples / config.batch_size
    # The paper's pruning window: steps 10k–25k of 32k, every 1k.
    prune_begin = config.prune_begin_step or round(train_steps * 10 / 32)
    prune_end = config.prune_end_step or round(train_steps * 25 / 32)
    return {
        "total": total,
        "end": max(1, common.scaled_step(config.end_step or round(25000 * per_batch), m)),
        "prune_begin": common.scaled_step(prune_begin, m),
        "prune_end": max(common.scaled_step(prune_begin, m) + 1, common.scaled_step(prune_end, m)),
        "prune_frequency": max(1, config.prune_frequency or round(train_steps / 32)),
        "steps_per_epoch": steps_per_epoch,
        "warmup": common.scaled_step(config.warmup_epochs * steps_per_epoch, m),
        "boundaries": [common.scaled_step(e * steps_per_epoch, m)
                       for e in common.parse_floats(config.lr_drop_epochs)],
    }


def run(config: Config | None = None, **overrides) -> dict:
    """Trains ResNet on ImageNet for one configuration and evaluates it.

    Args:
      config: a `Config`; None uses the defaults.
      **overrides: `Config` fields to change.

    Returns:
      The results dict (also written to config.output_dir/results.json);
      test_accuracy is top-1 on the validation split, top5_accuracy top-5.
    """
    config = dataclasses.replace(config or Config(), **overrides)
    config.resnet_blocks = common.parse_ints(config.resnet_blocks)
    timer = common.Timer()
    common.set_seed(config.seed)
    steps = schedule_steps(config)
    run_steps = min(steps["total"], config.max_steps) if config.max_steps else steps["total"]

    strategy = common.get_strategy(config.strategy, config.tpu)
    train_ds, test_ds = data_lib.imagenet_datasets(
        config.batch_size, data_dir=config.tfds_data_dir, download=config.download,
        image_size=config.image_size, num_classes=config.num_classes,
        train_limit=config.train_limit, test_limit=config.test_limit, seed=config.seed,
    )

    def build_fn(width: float) -> keras.Model:
        return resnet(config.resnet_blocks, config.resnet_width * width,
                      num_classes=config.num_classes, image_size=config.image_size,
                      weight_decay=config.weight_decay)

    peak = config.learning_rate
    if config.scale_learning_rate:
        peak *= config.batch_size / REFERENCE_BATCH
    with strategy.scope():
        model, callbacks, method = common.build_method(
            config, build_fn, end_step=steps["end"],
            prune_begin_step=steps["prune_begin"], prune_end_step=steps["prune_end"],
            prune_frequency=steps["prune_frequency"],
        )
        dense_model = build_fn(1.0) if config.method == "small_dense" else None
        schedule = WarmupStepDecay(peak, steps["warmup"], steps["boundaries"],
                                   config.lr_drop_factor)
        model.compile(
            optimizer=keras.optimizers.SGD(schedule, momentum=config.momentum,
                                           nesterov=config.nesterov),
            loss=keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=config.label_smoothing),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                     keras.metrics.TopKCategoricalAccuracy(5, name="top5_accuracy")],
        )
    steps_per_epoch = max(1, math.ceil(steps["steps_per_epoch"]))
    model.fit(
        train_ds,
        epochs=common.fit_epochs(run_steps, steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        callbacks=callbacks + [common.StopAtStep(run_steps)],
        shuffle=False,  # the dataset shuffles itself
        verbose=config.verbose,
    )
    test_loss, test_accuracy, top5 = model.evaluate(test_ds, verbose=0)
    results = common.collect_results(
        config, model, config.method, script="imagenet_resnet50", dense_model=dense_model,
        test_loss=test_loss, test_accuracy=test_accuracy, total_steps=steps["total"],
        pruning_schedule=common.pruning_schedule_for(
            config.method, steps["prune_begin"], steps["prune_end"], steps["prune_frequency"]),
        epochs=run_steps / steps["steps_per_epoch"],
        data_source="tfds:imagenet2012", timer=timer,
        extra={"model": model.name, "top5_accuracy": float(top5), "end_step": steps["end"],
               "peak_learning_rate": peak, "image_size": config.image_size,
               "strategy": config.strategy},
    )
    common.write_results(config.output_dir, results)
    return results


def main(argv):
    del argv  # unused
    results = common.run_and_report(Config, run)
    print(f"top-5 accuracy       {results['top5_accuracy']:.4f}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
