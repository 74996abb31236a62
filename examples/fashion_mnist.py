"""Shared training and evaluation of the Fashion-MNIST examples (MLP and ConvNet).

`train_and_evaluate(config)` trains one configuration (a method at a sparsity
with a seed) and returns its results dict; `fashion_mnist_mlp.py`,
`fashion_mnist_cnn.py` and `reproduce.py` all go through it.

Hyperparameters follow the official RigL MNIST setup (batch 100, SGD with
Nesterov momentum 0.9, L2 weight decay 1e-4, ΔT = 100, α = 0.3, cosine
drop-fraction decay) except the learning rate: 0.1 instead of 0.2. On
Fashion-MNIST, lr 0.2 makes RigL diverge at 98% sparsity in some runs (the
loss spikes a few steps after a connectivity update, when the zero-initialized
connections grown where the gradient is largest take their first big
momentum steps; 3 of 10 such runs ended at 10-17% accuracy, see
docs/results.md), while lr 0.1 trained every seed we tried and is also
better for the dense model. Pass --learning_rate=0.2 for the official value.

The learning rate follows a cosine decay to zero over the run (so that short
runs end converged); T_end and the pruning window are fractions of the run,
so the training multiplier M stretches the steps, the learning-rate schedule
and T_end together.
"""

from __future__ import annotations

import dataclasses
import math
import os

import keras
import numpy as np

from examples import common
from examples import data as data_lib

__all__ = ["Config", "define_flags", "train_and_evaluate", "make_optimizer", "MODELS"]


@dataclasses.dataclass
class Config:
    """One Fashion-MNIST training run. Fields mirror the scripts' flags."""

    model: str = "mlp"
    method: str = "rigl"
    sparsity: float = 0.9
    distribution: str = "erk"
    epochs: float = 20.0
    batch_size: int = 100
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    delta_t: int = 100
    alpha: float = 0.3
    decay: str = "cosine"
    end_step: float = 0.75
    multiplier: float = 1.0
    prune_begin_step: float = 0.0
    prune_end_step: float = 0.75
    prune_frequency: int = 100
    seed: int = 0
    output_dir: str | None = None
    data_dir: str | None = None
    train_limit: int = 0
    test_limit: int = 0
    verbose: int = 0


def _l2(weight_decay: float):
    # weight_decay/2 · Σw², i.e. gradient weight_decay · w (TF's l2_loss convention).
    return keras.regularizers.L2(weight_decay / 2) if weight_decay else None


def lenet_300_100(width: float = 1.0, num_classes: int = 10,
                  weight_decay: float = 0.0) -> keras.Model:
    """LeNet-300-100 on 28×28 images: Flatten, Dense(300), Dense(100), Dense(10).

    Args:
      width: multiplier of the two hidden widths (Small-Dense uses < 1).
      num_classes: output units.
      weight_decay: L2 weight decay of every kernel (0: none).
    """
    def dense(units, name, activation=None):
        return keras.layers.Dense(units, activation=activation,
                                  kernel_regularizer=_l2(weight_decay), name=name)

    inputs = keras.Input((28, 28), name="image")
    x = keras.layers.Flatten(name="flatten")(inputs)
    x = dense(max(1, round(300 * width)), "fc1", "relu")(x)
    x = dense(max(1, round(100 * width)), "fc2", "relu")(x)
    outputs = dense(num_classes, "logits")(x)
    return keras.Model(inputs, outputs, name="lenet_300_100")


def small_convnet(width: float = 1.0, num_classes: int = 10,
                  weight_decay: float = 0.0) -> keras.Model:
    """A small ConvNet: two 3×3 Conv2D + max-pool stages, Dense(128), Dense(10).

    Args:
      width: multiplier of every filter count and the hidden width.
      num_classes: output units.
      weight_decay: L2 weight decay of every kernel (0: none).
    """
    def scaled(n):
        return max(1, round(n * width))

    def conv(filters, name):
        return keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                                   kernel_regularizer=_l2(weight_decay), name=name)

    inputs = keras.Input((28, 28), name="image")
    x = keras.layers.Reshape((28, 28, 1), name="add_channel")(inputs)
    x = conv(scaled(32), "conv1")(x)
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)
    x = conv(scaled(64), "conv2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(scaled(128), activation="relu", kernel_regularizer=_l2(weight_decay),
                           name="fc1")(x)
    outputs = keras.layers.Dense(num_classes, kernel_regularizer=_l2(weight_decay),
                                 name="logits")(x)
    return keras.Model(inputs, outputs, name="small_convnet")


#: --model -> (builder(width) -> dense model, script name).
MODELS = {"mlp": (lenet_300_100, "fashion_mnist_mlp"), "cnn": (small_convnet, "fashion_mnist_cnn")}


def define_flags(flag_values, **defaults) -> None:
    """Defines the flags of the Fashion-MNIST scripts in `flag_values`.

    Args:
      flag_values: an absl `FlagValues` (usually `flags.FLAGS`).
      **defaults: overrides of `Config`'s defaults for this script.
    """
    from absl import flags

    d = dataclasses.asdict(Config())
    d.update(defaults)
    common.define_method_flags(
        flag_values,
        **{k: d[k] for k in ("method", "sparsity", "distribution", "delta_t", "alpha",
                             "decay", "multiplier", "seed", "output_dir")},
    )
    fv = flag_values
    flags.DEFINE_float("epochs", d["epochs"], "Training epochs at M = 1 (fractions allowed).",
                       flag_values=fv)
    flags.DEFINE_integer("batch_size", d["batch_size"], "Batch size.", flag_values=fv)
    flags.DEFINE_float("learning_rate", d["learning_rate"], "Peak learning rate.",
                       flag_values=fv)
    flags.DEFINE_float("momentum", d["momentum"], "Nesterov momentum.", flag_values=fv)
    flags.DEFINE_float("weight_decay", d["weight_decay"], "L2 weight decay of every kernel.",
                       flag_values=fv)
    flags.DEFINE_float("warmup_epochs", d["warmup_epochs"],
                       "Linear learning-rate warm-up epochs at the start (cosine schedule).",
                       flag_values=fv)
    flags.DEFINE_enum("lr_schedule", d["lr_schedule"], ["cosine", "step", "constant"],
                      "Learning-rate schedule over the run: cosine decay to 0, ÷10 at "
                      "50% and 75% of the steps, or constant.", flag_values=fv)
    flags.DEFINE_float("end_step", d["end_step"],
                       "T_end as a fraction of the run's steps.", flag_values=fv)
    flags.DEFINE_float("prune_begin_step", d["prune_begin_step"],
                       "prune: first pruning step, as a fraction of the run.", flag_values=fv)
    flags.DEFINE_float("prune_end_step", d["prune_end_step"],
                       "prune: step at which the final sparsity is reached, as a "
                       "fraction of the run.", flag_values=fv)
    flags.DEFINE_integer("prune_frequency", d["prune_frequency"],
                         "prune: steps between pruning events.", flag_values=fv)
    flags.DEFINE_string("data_dir", d["data_dir"],
                        "Directory with the Fashion-MNIST idx files (default: a prepared "
                        "TFDS copy, else /usr/share/datasets/fashion-mnist).", flag_values=fv)
    flags.DEFINE_integer("train_limit", d["train_limit"],
                         "Use only the first N training images (0: all).", flag_values=fv)
    flags.DEFINE_integer("test_limit", d["test_limit"],
                         "Use only the first N test images (0: all).", flag_values=fv)
    flags.DEFINE_integer("verbose", d["verbose"], "Keras fit verbosity (0, 1 or 2).",
                         flag_values=fv)


def make_optimizer(config: Config, total_steps: int,
                   warmup_steps: int = 0) -> keras.optimizers.Optimizer:
    """SGD with Nesterov momentum and the configured learning-rate schedule.

    Args:
      config: the run's `Config` (learning_rate, momentum, lr_schedule).
      total_steps: steps of the run.
      warmup_steps: linear warm-up from 0 at the start (cosine schedule only).
    """
    lr = config.learning_rate
    if config.lr_schedule == "cosine":
        if warmup_steps:
            lr = keras.optimizers.schedules.CosineDecay(
                0.0, decay_steps=max(1, total_steps - warmup_steps), warmup_target=lr,
                warmup_steps=warmup_steps)
        else:
            lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=total_steps)
    elif config.lr_schedule == "step":
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(
            [int(0.5 * total_steps), int(0.75 * total_steps)], [lr, lr / 10, lr / 100]
        )
    elif config.lr_schedule != "constant":
        raise ValueError(f"Unknown lr_schedule {config.lr_schedule!r}.")
    return keras.optimizers.SGD(lr, momentum=config.momentum, nesterov=True)


def _fraction_step(fraction: float, total: int, name: str) -> int:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"`{name}` must be a fraction of the run in [0, 1]; got {fraction}.")
    return int(round(fraction * total))


def train_and_evaluate(config: Config, data: data_lib.ArrayData | None = None) -> dict:
    """Trains one configuration on Fashion-MNIST and evaluates it on the test set.

    Args:
      config: the run's `Config`.
      data: preloaded data (e.g. shared by a sweep); None loads it with
        `data.load_fashion_mnist(config.data_dir)`. The limits in `config`
        apply either way.

    Returns:
      The results dict (also written to config.output_dir/results.json if
      set, with the first layer's per-pixel connectivity before and after
      training in connectivity.npz for the MLP).
    """
    import tensorflow as tf

    timer = common.Timer()
    if config.model not in MODELS:
        raise ValueError(f"Unknown model {config.model!r}; choose one of {sorted(MODELS)}.")
    build_dense, script = MODELS[config.model]
    common.set_seed(config.seed)
    if data is None:
        data = data_lib.load_fashion_mnist(config.data_dir)
    data = data.limit(config.train_limit, config.test_limit)
    n_train = len(data.x_train)

    steps_per_epoch = math.ceil(n_train / config.batch_size)
    total_steps = common.steps_for(config.epochs, config.multiplier, steps_per_epoch)
    warmup_steps = common.steps_for(config.warmup_epochs, config.multiplier, steps_per_epoch) \
        if config.warmup_epochs else 0
    end_step = max(1, _fraction_step(config.end_step, total_steps, "end_step"))
    prune_begin = _fraction_step(config.prune_begin_step, total_steps, "prune_begin_step")
    prune_end = max(prune_begin + 1,
                    _fraction_step(config.prune_end_step, total_steps, "prune_end_step"))

    train_ds = (
        tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train))
        .shuffle(n_train, seed=config.seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(config.batch_size, drop_remainder=n_train >= config.batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )

    def build_fn(width: float) -> keras.Model:
        return build_dense(width, weight_decay=config.weight_decay)

    # RigL, SNFS and SNIP grow from the dense gradient of the training batch
    # itself, captured inside the train step (no extra pass, any backend).
    model, callbacks, method = common.build_method(
        config, build_fn, end_step=end_step,
        prune_begin_step=prune_begin, prune_end_step=prune_end,
        prune_frequency=config.prune_frequency,
    )
    dense_model = build_fn(1.0) if config.method == "small_dense" else None
    model.compile(
        optimizer=make_optimizer(config, total_steps, warmup_steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    connectivity_before = common.first_layer_connectivity(model)
    history = model.fit(
        train_ds,
        epochs=common.fit_epochs(total_steps, steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        callbacks=callbacks + [common.StopAtStep(total_steps)],
        shuffle=False,  # the dataset shuffles itself
        verbose=config.verbose,
    )
    test_loss, test_accuracy = model.evaluate(
        data.x_test, data.y_test, batch_size=1000, verbose=0
    )
    connectivity_after = common.first_layer_connectivity(model)

    sparsity, active, dense_params = common.measured_sparsity(model, dense_model)
    flops = common.flops_ratios(
        model, config.method, delta_t=config.delta_t, multiplier=config.multiplier,
        dense_model=dense_model,
        pruning_schedule=common.pruning_schedule_for(
            config.method, prune_begin, prune_end, config.prune_frequency),
        total_steps=total_steps,
    )
    logs = history.history
    results = {
        "script": script,
        "model": config.model,
        "method": config.method,
        "sparsity": 0.0 if config.method == "dense" else float(config.sparsity),
        "distribution": config.distribution,
        "seed": config.seed,
        "multiplier": float(config.multiplier),
        "epochs": float(config.epochs),
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "lr_schedule": config.lr_schedule,
        "warmup_epochs": float(config.warmup_epochs),
        "weight_decay": float(config.weight_decay),
        "delta_t": config.delta_t,
        "alpha": config.alpha,
        "end_step": end_step,
        "steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "train_examples": n_train,
        "test_examples": len(data.x_test),
        "train_accuracy": float(logs["accuracy"][-1]) if logs.get("accuracy") else None,
        "test_accuracy": float(test_accuracy),
        "test_loss": float(test_loss),
        "measured_sparsity": float(sparsity),
        "active_params": int(active),
        "dense_params": int(dense_params),
        "mask_updates": int(sum(logs.get("mask_updates", []))),
        "connections_changed": int(sum(logs.get("connections_changed", []))),
        **{k: flops[k] for k in ("inference_flops_ratio", "training_flops_ratio")},
        "data_source": data.source,
        "wall_time_s": timer(),
    }
    if config.output_dir:
        os.makedirs(config.output_dir, exist_ok=True)
        if connectivity_before is not None:
            np.savez(
                os.path.join(config.output_dir, "connectivity.npz"),
                before=connectivity_before, after=connectivity_after,
            )
        # results.json last: its presence marks the run as finished.
        common.write_results(config.output_dir, results)
    return results
