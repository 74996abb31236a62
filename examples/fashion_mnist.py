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

`--preset=official_mnist` switches to the regime of the official MNIST code
(google-research/rigl, rigl/mnist/mnist_train_eval.py) instead: see
`PRESETS` and `apply_preset`. Flags given explicitly still win over it.
"""

from __future__ import annotations

import dataclasses
import math
import os

import keras
import numpy as np

from examples import common
from examples import data as data_lib

__all__ = [
    "Config", "define_flags", "config_from_flags", "train_and_evaluate", "make_optimizer",
    "learning_rate_schedule", "MODELS", "PRESETS", "apply_preset", "official_mnist_preset",
    "lr_boundaries", "resolve_step", "OFFICIAL_SMALL_DENSE_HIDDEN", "SMALL_DENSE_RULES",
]


@dataclasses.dataclass
class Config:
    """One Fashion-MNIST training run. Fields mirror the scripts' flags.

    Steps and epochs are given at M = 1 and scaled by `multiplier`.

    * `end_step`, `prune_begin_step`, `prune_end_step`: a float is a fraction
      of the run in [0, 1]; an int (or a whole float > 1, as flags give it)
      is a step count, as the official code gives T_end = 50000.
    * `lr_schedule`: "cosine" (to 0 over the run, after `warmup_epochs`),
      "step" (÷10 at 50% and 75% of the run), "constant", or "piecewise":
      divided by `lr_drop_factor` at each of `lr_drop_epochs`.
    * `sparsity_scales`: ((selector, scale), ...): those weights get sparsity
      scale·S (`sparsify(custom_sparsity=...)`); `dense_layers` stay dense;
      every other weight follows `distribution`.
    * `small_dense_rule`: how Small-Dense is sized: "params" or "storage"
      (`rigl_keras.baselines.small_dense_width`), or "fixed": the hidden
      sizes `small_dense_hidden`, by default the official ones
      (`OFFICIAL_SMALL_DENSE_HIDDEN`).
    * `timing`: "keras" or "official" update timing of the dynamic-sparse
      callbacks (see `rigl_keras.UpdateSchedule`; "official" needs
      `steps_per_execution=1`). No preset changes it.
    * `preset`: the preset `apply_preset` applied ("" for none).
    """

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
    lr_drop_epochs: tuple[float, ...] = ()
    lr_drop_factor: float = 3.0
    warmup_epochs: float = 0.0
    delta_t: int = 100
    alpha: float = 0.3
    decay: str = "cosine"
    timing: str = "keras"
    end_step: float | int = 0.75
    multiplier: float = 1.0
    prune_begin_step: float | int = 0.0
    prune_end_step: float | int = 0.75
    prune_frequency: int = 100
    sparsity_scales: tuple[tuple[str, float], ...] = ()
    dense_layers: tuple[str, ...] = ()
    steps_per_execution: int = 1
    small_dense_rule: str = "params"
    small_dense_hidden: tuple[int, ...] = ()
    preset: str = ""
    seed: int = 0
    output_dir: str | None = None
    data_dir: str | None = None
    train_limit: int = 0
    test_limit: int = 0
    verbose: int = 0


def _l2(weight_decay: float):
    # weight_decay/2 · Σw², i.e. gradient weight_decay · w (TF's l2_loss convention).
    return keras.regularizers.L2(weight_decay / 2) if weight_decay else None


def _hidden(width: float, sizes, defaults: tuple[int, ...]) -> tuple[int, ...]:
    """Hidden sizes: `sizes` as given, else `defaults` × `width` (rounded, at least 1)."""
    if sizes:
        sizes = tuple(int(n) for n in sizes)
        if len(sizes) != len(defaults) or min(sizes) < 1:
            raise ValueError(
                f"`hidden_sizes` must be {len(defaults)} positive ints (at width 1: "
                f"{defaults}); got {sizes}.")
        return sizes
    return tuple(max(1, round(n * width)) for n in defaults)


def lenet_300_100(width: float = 1.0, num_classes: int = 10,
                  weight_decay: float = 0.0, hidden_sizes=None) -> keras.Model:
    """LeNet-300-100 on 28×28 images: Flatten, Dense(300), Dense(100), Dense(10).

    Args:
      width: multiplier of the two hidden widths (Small-Dense uses < 1).
      num_classes: output units.
      weight_decay: L2 weight decay of every kernel (0: none).
      hidden_sizes: the two hidden widths, replacing 300·width, 100·width
        (e.g. the official Small-Dense (8, 8)).
    """
    def dense(units, name, activation=None):
        return keras.layers.Dense(units, activation=activation,
                                  kernel_regularizer=_l2(weight_decay), name=name)

    h1, h2 = _hidden(width, hidden_sizes, (300, 100))
    inputs = keras.Input((28, 28), name="image")
    x = keras.layers.Flatten(name="flatten")(inputs)
    x = dense(h1, "fc1", "relu")(x)
    x = dense(h2, "fc2", "relu")(x)
    outputs = dense(num_classes, "logits")(x)
    return keras.Model(inputs, outputs, name="lenet_300_100")


def small_convnet(width: float = 1.0, num_classes: int = 10,
                  weight_decay: float = 0.0, hidden_sizes=None) -> keras.Model:
    """A small ConvNet: two 3×3 Conv2D + max-pool stages, Dense(128), Dense(10).

    Args:
      width: multiplier of every filter count and the hidden width.
      num_classes: output units.
      weight_decay: L2 weight decay of every kernel (0: none).
      hidden_sizes: (conv1 filters, conv2 filters, fc1 units), replacing
        (32, 64, 128)·width.
    """
    sizes = dict(zip((32, 64, 128), _hidden(width, hidden_sizes, (32, 64, 128))))

    def scaled(n):
        return sizes[n]

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

#: Values of --small_dense_rule.
SMALL_DENSE_RULES = ("params", "storage", "fixed")

#: Small-Dense hidden sizes fixed by an official experiment, by (model, S):
#: rigl/rigl_tf2/mlp_configs/small_dense.gin trains LeNet-300-100 with hidden
#: sizes (8, 8) against the 98%-sparse model (6,442 parameters against 5,734).
OFFICIAL_SMALL_DENSE_HIDDEN = {("mlp", 0.98): (8, 8)}


def official_mnist_preset(method: str) -> dict:
    """The `Config` values of the official MNIST regime for `method`.

    From google-research/rigl, rigl/mnist/mnist_train_eval.py (its flag
    defaults): batch 100, SGD with Nesterov momentum 0.9 at lr 0.2, L2 1e-4,
    200 epochs; the learning rate is divided by 3 at epochs 75 and 95 for
    every sparse method (the code's `lr_drop_epoch` branch, taken whenever
    the training method is not the dense baseline) and at epochs 60, 70 and
    80 for the dense baseline. Mask updates every ΔT = 100 steps with
    α = 0.3 and cosine decay until T_end = step 50000 (41.7% of the 120,000
    steps). Sparsities by layer: fc1 at S, fc2 at 0.9·S (`sparsity_scale`),
    the output layer dense; pruning ramps the same per-layer targets from
    step 2000 to step 30000, every 500 steps.

    The update timing stays the library's default ("keras") unless
    `timing="official"` is given too (--timing=official, which needs
    --steps_per_execution=1); `steps_per_execution=100` (a divisor of ΔT
    and of the pruning steps) only makes the runs faster.
    """
    return dict(
        epochs=200.0, batch_size=100, learning_rate=0.2, momentum=0.9, weight_decay=1e-4,
        lr_schedule="piecewise", lr_drop_factor=3.0, warmup_epochs=0.0,
        lr_drop_epochs=(60.0, 70.0, 80.0) if method == "dense" else (75.0, 95.0),
        delta_t=100, alpha=0.3, decay="cosine", end_step=50000,
        prune_begin_step=2000, prune_end_step=30000, prune_frequency=500,
        distribution="uniform", sparsity_scales=(("fc1", 1.0), ("fc2", 0.9)),
        dense_layers=("logits",), steps_per_execution=100,
    )


#: --preset name -> (method -> {Config field: value}); models it applies to.
PRESETS = {"official_mnist": (official_mnist_preset, ("mlp",))}


def apply_preset(config: Config, name: str, keep=()) -> Config:
    """`config` with the values of preset `name`, except the fields in `keep`.

    Args:
      config: the run's `Config` (its method and model select the values).
      name: a key of `PRESETS`, or "" for none (`config` is returned as is).
      keep: names of fields given explicitly, which win over the preset.

    Raises:
      ValueError: for an unknown preset, or a model it does not apply to.
    """
    if not name:
        return config
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    values_fn, models = PRESETS[name]
    if config.model not in models:
        raise ValueError(f"Preset {name!r} is defined for models {models}; got "
                         f"model {config.model!r}.")
    keep = set(keep)
    values = {k: v for k, v in values_fn(config.method).items() if k not in keep}
    return dataclasses.replace(config, preset=name, **values)


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
    flags.DEFINE_enum("lr_schedule", d["lr_schedule"], ["cosine", "step", "constant", "piecewise"],
                      "Learning-rate schedule over the run: cosine decay to 0, ÷10 at "
                      "50% and 75% of the steps, constant, or ÷--lr_drop_factor at each "
                      "of --lr_drop_epochs.", flag_values=fv)
    common.define_schedule_flags(
        fv, **{k: d[k] for k in ("end_step", "prune_begin_step", "prune_end_step",
                                 "prune_frequency")})
    flags.DEFINE_list("lr_drop_epochs", [f"{e:g}" for e in d["lr_drop_epochs"]],
                      "piecewise schedule: epochs (at M = 1) at which the learning rate "
                      "is divided by --lr_drop_factor.", flag_values=fv)
    flags.DEFINE_float("lr_drop_factor", d["lr_drop_factor"],
                       "piecewise schedule: divisor of each drop.", flag_values=fv)
    flags.DEFINE_list("sparsity_scales", [f"{k}:{v:g}" for k, v in d["sparsity_scales"]],
                      "Per-layer sparsities relative to S, as selector:scale pairs, e.g. "
                      "fc1:1,fc2:0.9 (fc2 at 0.9·S); other weights follow --distribution.",
                      flag_values=fv)
    flags.DEFINE_list("dense_layers", list(d["dense_layers"]),
                      "Layers (selectors) kept dense, e.g. logits.", flag_values=fv)
    flags.DEFINE_enum("timing", d["timing"], ["keras", "official"],
                      "Update timing of the drop/grow callbacks: keras (after optimizer "
                      "step t, t mod ΔT = 0, 0 < t < T_end) or official (also step 0 and "
                      "T_end, RigL's update batch not trained on; needs "
                      "--steps_per_execution=1). Presets leave it alone.", flag_values=fv)
    flags.DEFINE_integer("steps_per_execution", d["steps_per_execution"],
                         "Keras steps_per_execution (must divide --delta_t; only speed; "
                         "1 on the PyTorch backend).", flag_values=fv)
    flags.DEFINE_enum("small_dense_rule", d["small_dense_rule"], list(SMALL_DENSE_RULES),
                      "small_dense: match the sparse model's parameter count (params), its "
                      "storage bits with one bit per mask entry (storage, the official "
                      "ImageNet rule), or use --small_dense_hidden / the official fixed "
                      "sizes (fixed).", flag_values=fv)
    flags.DEFINE_list("small_dense_hidden", [str(n) for n in d["small_dense_hidden"]],
                      "small_dense with --small_dense_rule=fixed: the hidden sizes (mlp: "
                      "2, cnn: 3); empty: the official ones, (8,8) for the mlp at S=0.98.",
                      flag_values=fv)
    flags.DEFINE_enum("preset", d["preset"] or None, sorted(PRESETS),
                      "A regime that sets the flags it covers (flags given explicitly "
                      "win). official_mnist: the official MNIST code's regime (lr 0.2 "
                      "÷3 at epochs 75, 95; 200 epochs; T_end = step 50000; fc1 at S, fc2 "
                      "at 0.9·S, output dense; pruning steps 2000-30000 every 500).",
                      flag_values=fv)
    flags.DEFINE_string("data_dir", d["data_dir"],
                        "Directory with the Fashion-MNIST idx files (default: a prepared "
                        "TFDS copy, else /usr/share/datasets/fashion-mnist).", flag_values=fv)
    flags.DEFINE_integer("train_limit", d["train_limit"],
                         "Use only the first N training images (0: all).", flag_values=fv)
    flags.DEFINE_integer("test_limit", d["test_limit"],
                         "Use only the first N test images (0: all).", flag_values=fv)
    flags.DEFINE_integer("verbose", d["verbose"], "Keras fit verbosity (0, 1 or 2).",
                         flag_values=fv)


def _parse_scales(items) -> tuple[tuple[str, float], ...]:
    pairs = []
    for item in items:
        if isinstance(item, str):
            if ":" not in item:
                raise ValueError(f"`sparsity_scales` entries are selector:scale; got {item!r}.")
            key, value = item.rsplit(":", 1)
            item = (key.strip(), float(value))
        pairs.append((str(item[0]), float(item[1])))
    return tuple(pairs)


def config_from_flags(flag_values) -> Config:
    """The `Config` the parsed flags describe, with --preset applied under them."""
    config = common.config_from_flags(Config, flag_values)
    config.lr_drop_epochs = common.parse_floats(config.lr_drop_epochs)
    config.sparsity_scales = _parse_scales(config.sparsity_scales)
    config.dense_layers = tuple(str(v).strip() for v in config.dense_layers if str(v).strip())
    config.small_dense_hidden = common.parse_ints(config.small_dense_hidden)
    config.preset = config.preset or ""
    explicit = [f.name for f in dataclasses.fields(Config)
                if f.name != "preset" and f.name in flag_values and flag_values[f.name].present]
    return apply_preset(config, config.preset, keep=explicit)


def resolve_step(value, total_steps: int, multiplier: float, name: str) -> int:
    """A schedule point in steps: a fraction of the run, or a step count scaled by M.

    Args:
      value: a float in [0, 1] (fraction of `total_steps`), or an int step
        count at M = 1 (a whole float > 1 counts as one, as flags give it).
      total_steps: the run's steps (already scaled by M).
      multiplier: the training multiplier M.
      name: the argument's name for errors.

    Raises:
      ValueError: for a negative value or a float > 1 that is not whole.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"`{name}` must be a fraction in [0, 1] or a step count; got {value!r}.")
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0; got {value}.")
    if isinstance(value, (int, np.integer)):
        return common.scaled_step(int(value), multiplier)
    if value <= 1.0:
        return int(round(float(value) * total_steps))
    if float(value).is_integer():
        return common.scaled_step(int(value), multiplier)
    raise ValueError(
        f"`{name}` must be a fraction of the run in [0, 1] or a whole number of steps; "
        f"got {value}.")


def lr_boundaries(config: Config, steps_per_epoch: int) -> list[int]:
    """Steps of the piecewise schedule's drops: round(epoch × M × steps per epoch)."""
    return [int(round(float(e) * config.multiplier * steps_per_epoch))
            for e in config.lr_drop_epochs]


def make_optimizer(config: Config, total_steps: int, warmup_steps: int = 0,
                   steps_per_epoch: int | None = None) -> keras.optimizers.Optimizer:
    """SGD with Nesterov momentum and the configured learning-rate schedule.

    Args:
      config: the run's `Config` (learning_rate, momentum, lr_schedule).
      total_steps: steps of the run.
      warmup_steps: linear warm-up from 0 at the start (cosine schedule only).
      steps_per_epoch: for the piecewise schedule (its drops are in epochs).

    Raises:
      ValueError: as `learning_rate_schedule`.
    """
    lr = learning_rate_schedule(config, total_steps, warmup_steps, steps_per_epoch)
    return keras.optimizers.SGD(lr, momentum=config.momentum, nesterov=True)


def learning_rate_schedule(config: Config, total_steps: int, warmup_steps: int = 0,
                           steps_per_epoch: int | None = None):
    """The learning rate (a float or a Keras schedule) of `config.lr_schedule`.

    Args:
      as `make_optimizer`.

    Raises:
      ValueError: for an unknown schedule, or a piecewise one without drop
        epochs or steps per epoch, with drops that do not increase, or with a
        drop factor <= 0.
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
    elif config.lr_schedule == "piecewise":
        if not config.lr_drop_epochs or not steps_per_epoch:
            raise ValueError("lr_schedule='piecewise' needs `lr_drop_epochs` and "
                             "`steps_per_epoch`.")
        if not config.lr_drop_factor > 0:
            raise ValueError(f"`lr_drop_factor` must be > 0; got {config.lr_drop_factor}.")
        boundaries = lr_boundaries(config, steps_per_epoch)
        if boundaries != sorted(set(boundaries)):
            raise ValueError(f"`lr_drop_epochs` must increase; got {config.lr_drop_epochs}.")
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(
            boundaries, [lr / config.lr_drop_factor ** i for i in range(len(boundaries) + 1)])
    elif config.lr_schedule != "constant":
        raise ValueError(f"Unknown lr_schedule {config.lr_schedule!r}.")
    return lr


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
    m = config.multiplier
    end_step = max(1, resolve_step(config.end_step, total_steps, m, "end_step"))
    prune_begin = resolve_step(config.prune_begin_step, total_steps, m, "prune_begin_step")
    prune_end = max(prune_begin + 1,
                    resolve_step(config.prune_end_step, total_steps, m, "prune_end_step"))

    train_ds = (
        tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train))
        .shuffle(n_train, seed=config.seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(config.batch_size, drop_remainder=n_train >= config.batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )

    def build_fn(width: float) -> keras.Model:
        return build_dense(width, weight_decay=config.weight_decay)

    custom_sparsity = {key: scale * float(config.sparsity)
                       for key, scale in config.sparsity_scales}
    small_dense_build = None
    if config.method == "small_dense" and config.small_dense_rule == "fixed":
        hidden = tuple(config.small_dense_hidden) or OFFICIAL_SMALL_DENSE_HIDDEN.get(
            (config.model, round(float(config.sparsity), 6)))
        if not hidden:
            raise ValueError(
                f"small_dense_rule='fixed' needs `small_dense_hidden`: the official code "
                f"fixes hidden sizes only for {sorted(OFFICIAL_SMALL_DENSE_HIDDEN)} "
                f"(model, sparsity); got ({config.model!r}, {config.sparsity}).")

        def small_dense_build():
            return build_dense(1.0, weight_decay=config.weight_decay, hidden_sizes=hidden)
    elif config.small_dense_rule not in SMALL_DENSE_RULES:
        raise ValueError(f"Unknown small_dense_rule {config.small_dense_rule!r}; choose one "
                         f"of {SMALL_DENSE_RULES}.")

    # RigL, SNFS and SNIP grow from the dense gradient of the training batch
    # itself, captured inside the train step (no extra pass, any backend).
    model, callbacks, method = common.build_method(
        config, build_fn, end_step=end_step,
        prune_begin_step=prune_begin, prune_end_step=prune_end,
        prune_frequency=config.prune_frequency,
        custom_sparsity=custom_sparsity, dense_layers=config.dense_layers,
        small_dense_rule=config.small_dense_rule, small_dense_build=small_dense_build,
    )
    dense_model = build_fn(1.0) if config.method == "small_dense" else None
    # steps_per_execution only changes speed; Keras' PyTorch trainer takes only 1.
    steps_per_execution = 1 if keras.backend.backend() == "torch" else int(
        config.steps_per_execution)
    model.compile(
        optimizer=make_optimizer(config, total_steps, warmup_steps, steps_per_epoch),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
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
        "preset": config.preset,
        "learning_rate": config.learning_rate,
        "lr_schedule": config.lr_schedule,
        "lr_drop_steps": (lr_boundaries(config, steps_per_epoch)
                          if config.lr_schedule == "piecewise" else []),
        "custom_sparsity": custom_sparsity,
        "dense_layers": list(config.dense_layers),
        "layer_sparsity": common.layer_sparsity(model),
        "steps_per_execution": steps_per_execution,
        "prune_steps": ([prune_begin, prune_end, int(config.prune_frequency)]
                        if config.method == "prune" else []),
        "warmup_epochs": float(config.warmup_epochs),
        "weight_decay": float(config.weight_decay),
        "delta_t": config.delta_t,
        "alpha": config.alpha,
        "timing": config.timing,
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
