"""Shared pieces of the example scripts: flags, method set-up, FLOPs, results.

Each script keeps its flags in a `define_flags(flag_values)` function that is
called only when the script runs as a program, so every script (and the
sweep in reproduce.py, and the tests) can import the others and call their
`run(config)` functions in-process without absl's duplicate-flag errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import keras
import numpy as np

__all__ = [
    "define_method_flags",
    "define_schedule_flags",
    "layer_sparsity",
    "config_from_flags",
    "parse_ints",
    "parse_floats",
    "get_strategy",
    "STRATEGIES",
    "collect_results",
    "set_seed",
    "build_method",
    "StopAtStep",
    "measured_sparsity",
    "flops_ratios",
    "first_layer_connectivity",
    "declare_main_key_flags",
    "write_results",
    "read_results",
    "format_results",
    "pruning_schedule_for",
    "steps_for",
    "fit_epochs",
    "Timer",
    "RESULT_KEYS",
]

#: Keys every results.json holds (others may be added by a script).
RESULT_KEYS = (
    "script", "method", "sparsity", "distribution", "seed", "multiplier", "epochs",
    "steps", "test_accuracy", "test_loss", "measured_sparsity", "active_params",
    "dense_params", "inference_flops_ratio", "training_flops_ratio", "wall_time_s",
    "data_source",
)


def define_method_flags(flag_values, *, multiplier: bool = True, **defaults) -> None:
    """Defines the flags every example shares (method and sparse-training schedule).

    method, sparsity, distribution, delta_t, alpha, decay, multiplier, seed
    and output_dir.

    Args:
      flag_values: the absl `FlagValues` to define them in.
      multiplier: define --multiplier (scripts that count steps, not epochs,
        may leave it out).
      **defaults: per-script defaults overriding the ones below.
    """
    from absl import flags

    from rigl_keras import baselines

    d = dict(
        method="rigl", sparsity=0.9, distribution="erk", delta_t=100, alpha=0.3,
        decay="cosine", multiplier=1.0, seed=0, output_dir=None,
    )
    unknown = sorted(set(defaults) - set(d))
    if unknown:
        raise ValueError(f"define_method_flags: unknown defaults {unknown}; known: {sorted(d)}.")
    d.update(defaults)
    flags.DEFINE_enum("method", d["method"], baselines.METHODS,
                      "Training method.", flag_values=flag_values)
    flags.DEFINE_float("sparsity", d["sparsity"],
                       "Overall sparsity S of the masked weights (ignored by dense).",
                       flag_values=flag_values)
    flags.DEFINE_enum("distribution", d["distribution"], ["uniform", "er", "erk"],
                      "Per-layer sparsity distribution (uniform keeps the first layer "
                      "dense).", flag_values=flag_values)
    flags.DEFINE_integer("delta_t", d["delta_t"], "Steps between connectivity updates (ΔT).",
                         flag_values=flag_values)
    flags.DEFINE_float("alpha", d["alpha"], "Initial drop/grow fraction α.",
                       flag_values=flag_values)
    flags.DEFINE_enum("decay", d["decay"], ["cosine", "constant"],
                      "Decay of the drop fraction.", flag_values=flag_values)
    if multiplier:
        flags.DEFINE_float("multiplier", d["multiplier"],
                           "Training multiplier M: scales the training steps, the "
                           "learning-rate schedule and every connectivity schedule.",
                           flag_values=flag_values)
    flags.DEFINE_integer("seed", d["seed"], "Random seed (weights, masks, data order).",
                         flag_values=flag_values)
    flags.DEFINE_string("output_dir", d["output_dir"],
                        "Directory for results.json (nothing is written if unset).",
                        flag_values=flag_values)


def define_schedule_flags(flag_values, **defaults) -> None:
    """Defines the schedule flags of the drop/grow end and of gradual pruning.

    end_step (T_end), prune_begin_step, prune_end_step (fractions of the
    run) and prune_frequency (steps), shared by the Fashion-MNIST scripts
    and char_lm.py.

    Args:
      flag_values: the absl `FlagValues` to define them in.
      **defaults: per-script defaults overriding the ones below.
    """
    from absl import flags

    d = dict(end_step=0.75, prune_begin_step=0.0, prune_end_step=0.75, prune_frequency=100)
    unknown = sorted(set(defaults) - set(d))
    if unknown:
        raise ValueError(f"define_schedule_flags: unknown defaults {unknown}; known: {sorted(d)}.")
    d.update(defaults)
    fv = flag_values
    flags.DEFINE_float("end_step", d["end_step"],
                       "T_end: the last drop/grow step, as a fraction of the run's steps "
                       "(a whole number > 1: a step count).", flag_values=fv)
    flags.DEFINE_float("prune_begin_step", d["prune_begin_step"],
                       "prune: first pruning step, as a fraction of the run (a whole "
                       "number > 1: a step count).", flag_values=fv)
    flags.DEFINE_float("prune_end_step", d["prune_end_step"],
                       "prune: step at which the final sparsity is reached, as a fraction "
                       "of the run (a whole number > 1: a step count).", flag_values=fv)
    flags.DEFINE_integer("prune_frequency", d["prune_frequency"],
                         "prune: steps between pruning events.", flag_values=fv)


def config_from_flags(config_class, flag_values):
    """An instance of the dataclass `config_class` with every field named by a flag set from it."""
    names = {field.name for field in dataclasses.fields(config_class)}
    values = {name: flag_values[name].value for name in names if name in flag_values}
    return config_class(**values)


def set_seed(seed: int) -> None:
    """Seeds Python, numpy and the backend for reproducible weights and data order."""
    keras.utils.set_random_seed(int(seed))


def build_method(config, build_fn, *, end_step, prune_begin_step,
                 prune_end_step, prune_frequency, grow_data=None, custom_sparsity=None,
                 dense_layers=(), small_dense_rule="params", small_dense_build=None):
    """The uncompiled model and callbacks of `config.method` (see `rigl_keras.baselines`).

    Args:
      config: an example config with method, sparsity, distribution, seed,
        delta_t, alpha and decay.
      build_fn: width multiplier -> built dense model.
      grow_data: None (the default): RigL, SNFS and SNIP use the dense
        gradient of the training batch itself, captured in the train step.
        Otherwise separate batches for their scores (see `RigLCallback`).
      end_step: T_end (int step or fraction of the fit).
      prune_begin_step, prune_end_step, prune_frequency: the pruning schedule.
      custom_sparsity: {selector: sparsity} fixed per layer (`sparsify`);
        for pruning, the per-layer final sparsities.
      dense_layers: selectors of weights kept dense.
      small_dense_rule: "params" or "storage" (`baselines.small_dense_width`).
      small_dense_build: for small_dense, a function building the narrow
        model directly (fixed hidden sizes); overrides the rule.

    Returns:
      (model, callbacks, method).
    """
    from rigl_keras import baselines

    method = baselines.get(config.method)
    custom_sparsity = dict(custom_sparsity or {})
    dense_layers = list(dense_layers or ())
    if method.name == "small_dense":
        if small_dense_build is not None:
            return small_dense_build(), [], method
        if small_dense_rule != "params" or custom_sparsity or dense_layers:
            width = baselines.small_dense_width(
                build_fn, config.sparsity, rule=small_dense_rule,
                distribution=config.distribution, custom_sparsity=custom_sparsity,
                dense_layers=dense_layers)
            return build_fn(width), [], method
    elif custom_sparsity or dense_layers:
        model, callbacks = _build_with_layer_sparsities(
            method, config, build_fn, custom_sparsity, dense_layers, end_step=end_step,
            prune_begin_step=prune_begin_step, prune_end_step=prune_end_step,
            prune_frequency=prune_frequency, grow_data=grow_data)
        return model, callbacks, method
    model, callbacks = method.build(
        build_fn,
        config.sparsity,
        distribution=config.distribution,
        seed=config.seed,
        delta_t=config.delta_t,
        alpha=config.alpha,
        end_step=end_step,
        decay=config.decay,
        **_timing(config),
        grow_data=grow_data if method.uses_gradients else None,
        prune_begin_step=prune_begin_step,
        prune_end_step=prune_end_step,
        prune_frequency=prune_frequency,
    )
    return model, callbacks, method


def _build_with_layer_sparsities(method, config, build_fn, custom_sparsity, dense_layers, *,
                                 end_step, prune_begin_step, prune_end_step, prune_frequency,
                                 grow_data):
    """`Method.build` with per-layer sparsities (`custom_sparsity`, `dense_layers`).

    As `rigl_keras.baselines.Method.build`, with the map passed to `sparsify`,
    to SNIP, and (as final sparsities) to pruning, which the official MNIST
    code prunes with the same per-layer map.
    """
    import rigl_keras as rk
    from rigl_keras import baselines

    sparsity, distribution, seed = config.sparsity, config.distribution, config.seed
    layers = dict(custom_sparsity=custom_sparsity, dense_layers=dense_layers)
    dense = build_fn(1.0)
    if method.name == "dense":
        return dense, []
    if method.name == "prune":
        finals = rk.sparsity_distribution(dense, sparsity, distribution, **layers)
        model = rk.sparsify(dense, 0.0, "uniform", seed=seed, capture_gradients=False)
        return model, [baselines.MagnitudePruningCallback(
            finals, prune_begin_step, prune_end_step, prune_frequency)]
    model = rk.sparsify(dense, sparsity, distribution, seed=seed, **layers,
                        capture_gradients=(method.uses_gradients and grow_data is None
                                           and method.name != "snfs"))
    schedule = dict(delta_t=config.delta_t, alpha=config.alpha, end_step=end_step,
                    decay=config.decay, seed=seed, **_timing(config))
    if method.name == "static":
        return model, [baselines.StaticCallback()]
    if method.name == "snip":
        return model, [baselines.SNIPCallback(sparsity, distribution, grow_data, seed=seed,
                                              **layers)]
    if method.name == "set":
        return model, [baselines.SETCallback(**schedule)]
    if method.name == "snfs":
        snfs = baselines.SNFSCallback(grow_data=grow_data, **schedule)
        if grow_data is None:
            rk.capture_momentum(model, snfs.momentum)  # as Method.build does
        return model, [snfs]
    if method.name == "rigl":
        return model, [rk.RigLCallback(grow_data=grow_data, **schedule)]
    raise ValueError(f"Method {method.name!r} does not take per-layer sparsities.")


def _timing(config) -> dict:
    """{"timing": ...} for configs that have a non-default update timing, else {}."""
    timing = getattr(config, "timing", "keras")
    return {} if timing == "keras" else {"timing": timing}


def layer_sparsity(model) -> dict:
    """{masked weight name: measured sparsity} (empty for a model without masks)."""
    import rigl_keras as rk

    result = {}
    for w in rk.masked_weights(model):
        mask = keras.ops.convert_to_numpy(w.mask)
        result[w.name] = 1.0 - float(np.count_nonzero(mask)) / mask.size
    return result


class StopAtStep(keras.callbacks.Callback):
    """Stops `fit` once the optimizer has taken `total_steps` steps.

    Lets a run end mid-epoch, so a training length that is not a whole number
    of epochs (e.g. 97.6k CIFAR steps, or epochs × a fractional M) is exact.
    """

    def __init__(self, total_steps: int):
        super().__init__()
        self.total_steps = int(total_steps)

    def on_train_batch_end(self, batch, logs=None):
        # convert_to_numpy, not int(): under tf.distribute the counter is a
        # MirroredVariable, which int() rejects.
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if step >= self.total_steps:
            self.model.stop_training = True


def _kernel_counts(model) -> tuple[int, int]:
    from rigl_keras import sparsity_report

    report = sparsity_report(model)
    return report.active, report.total


def measured_sparsity(model, dense_model=None) -> tuple[float, int, int]:
    """Sparsity of the trained model's kernels relative to the dense model.

    1 − (active kernel weights) / (kernel weights of the dense model), from
    `rigl_keras.sparsity_report`. For masked models the two totals agree; for
    Small-Dense this compares the narrow model with the full-width one.

    Returns:
      (sparsity, active kernel weights, dense kernel weights).
    """
    active, total = _kernel_counts(model)
    if dense_model is not None:
        total = _kernel_counts(dense_model)[1]
    return 1.0 - active / total, active, total


def flops_ratios(model, method, *, delta_t=100, multiplier=1.0, dense_model=None,
                 pruning_schedule=None, total_steps=None) -> dict:
    """Inference and training FLOPs of a trained model relative to the dense model.

    A thin adapter over `rigl_keras.flops` (paper Appendix A). Sparse models
    are counted from their masks; Small-Dense from its own (narrow) layers
    against `dense_model`. Training FLOPs are per step, times M, relative to
    dense training with M = 1.

    Args:
      model: the trained model (masked, or dense for dense / small_dense).
      method: one of `rigl_keras.baselines.METHODS`.
      delta_t: ΔT of RigL.
      multiplier: the training multiplier M.
      dense_model: the full-width dense model (required for small_dense).
      pruning_schedule: for prune, a `schedules.PolynomialSchedule` with the
        run's begin/end/frequency in steps (its final sparsity is unused).
      total_steps: for prune, the run's number of training steps.

    Returns:
      {"inference_flops_ratio", "training_flops_ratio", "inference_flops",
      "dense_inference_flops"}.
    """
    from rigl_keras import flops

    report = flops.inference_flops(model)
    if method == "small_dense":
        if dense_model is None:
            raise ValueError("small_dense needs `dense_model` to compare with.")
        f_dense = flops.inference_flops(dense_model).dense_flops
        f_model = report.dense_flops
    else:
        f_dense = report.dense_flops
        f_model = report.flops
    prune_args = {}
    if method == "prune":
        prune_args = dict(pruning_schedule=pruning_schedule, total_steps=total_steps)
    training = flops.training_flops_ratio(
        method, f_model, f_dense, delta_t=int(delta_t), multiplier=float(multiplier),
        **prune_args,
    )
    inference = float(f_dense if method == "dense" else f_model)
    return {
        "inference_flops_ratio": inference / f_dense,
        "training_flops_ratio": float(training),
        "inference_flops": inference,
        "dense_inference_flops": float(f_dense),
    }


def pruning_schedule_for(method, begin, end, frequency):
    """The `PolynomialSchedule` shape of a prune run (None for other methods)."""
    from rigl_keras import schedules

    if method != "prune":
        return None
    return schedules.PolynomialSchedule(
        final_sparsity=0.5, begin_step=int(begin), end_step=max(int(end), int(begin) + 1),
        frequency=max(1, int(frequency)),
    )


def first_layer_connectivity(model) -> np.ndarray | None:
    """Active connections per input feature of the first masked Dense kernel.

    For an MLP on flattened images this is the number of first-layer weights
    that read each pixel (reshape to the image to get a heatmap). None if the
    first maskable weight is not a Dense kernel.
    """
    from rigl_keras import layers as masked_layers

    weights = masked_layers.maskable_weights(model)
    if not weights or not isinstance(weights[0].layer, keras.layers.Dense):
        return None
    weight = weights[0]
    masked = {id(w.layer) for w in masked_layers.masked_weights(model)}
    if id(weight.layer) in masked:
        mask = keras.ops.convert_to_numpy(weight.mask) != 0
    else:
        mask = np.ones(tuple(weight.layer.kernel.shape), dtype=bool)
    return mask.sum(axis=1).astype("int32")


def declare_main_key_flags(flag_values) -> None:
    """Makes the flags the example modules defined show in the program's --help.

    absl's --help lists only the key flags of the main module; flags defined
    by `define_method_flags` or `fashion_mnist.define_flags` belong to those
    modules, so a script that only calls them printed no flags at all.
    """
    import sys

    main = sys.argv[0]
    for module, module_flags in flag_values.flags_by_module_dict().items():
        if module == main or module.startswith("examples"):
            for flag in module_flags:
                flag_values.register_key_flag_for_module(main, flag)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_results(output_dir: str | None, results: dict) -> str | None:
    """Writes `results` to output_dir/results.json (atomically); returns the path."""
    if not output_dir:
        return None
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "results.json")
    # Write-then-rename: a sweep killed mid-write never leaves a half file
    # that a resumed sweep would take for a finished run.
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_results(path: str) -> dict | None:
    """The dict in a results.json, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_and_report(config_class, run, flag_values=None, make_config=None) -> dict:
    """A script's main: builds its config from flags, runs it, prints the results.

    Args:
      config_class: the script's `Config` dataclass.
      run: the script's `run(config) -> results` function.
      flag_values: absl flag values (default: the global FLAGS).
      make_config: flag values -> config, instead of `config_from_flags`
        (e.g. one that applies a preset).

    Returns:
      The results dict.
    """
    from absl import flags as absl_flags

    flag_values = absl_flags.FLAGS if flag_values is None else flag_values
    config = (make_config(flag_values) if make_config
              else config_from_flags(config_class, flag_values))
    results = run(config)
    print(format_results(results))
    if config.output_dir:
        print(f"results written to {config.output_dir}/results.json")
    return results


def format_results(results: dict) -> str:
    """A short human-readable summary of a results dict."""
    distribution = results["distribution"]
    custom = results.get("custom_sparsity") or {}
    if custom or results.get("dense_layers"):
        per_layer = [f"{k} at {v:g}" for k, v in custom.items()]
        per_layer += [f"{k} dense" for k in results.get("dense_layers") or ()]
        distribution += "; " + ", ".join(per_layer)
    lines = [
        f"method               {results['method']}",
        f"sparsity (target)    {results['sparsity']:g} ({distribution})",
        f"measured sparsity    {results['measured_sparsity']:.4f} "
        f"({results['active_params']} / {results['dense_params']} kernel weights active)",
        f"test accuracy        {results['test_accuracy']:.4f}",
        f"inference FLOPs      {results['inference_flops_ratio']:.3f}x dense",
        f"training FLOPs       {results['training_flops_ratio']:.3f}x dense (M = "
        f"{results['multiplier']:g})",
        f"steps                {results['steps']}",
        f"wall time            {results['wall_time_s']:.1f} s",
    ]
    return "\n".join(lines)


class Timer:
    """Wall-clock seconds since creation."""

    def __init__(self):
        self.start = time.time()

    def __call__(self) -> float:
        return time.time() - self.start


def scaled_step(step: float, multiplier: float) -> int:
    """A schedule anchor (in steps at M = 1) scaled by the training multiplier M."""
    return int(round(step * multiplier))


def steps_for(epochs: float, multiplier: float, steps_per_epoch: int) -> int:
    """round(epochs × M × steps per epoch), at least 1."""
    return max(1, int(round(float(epochs) * float(multiplier) * steps_per_epoch)))


def fit_epochs(total_steps: int, steps_per_epoch: int) -> int:
    """Keras epochs of `steps_per_epoch` needed to cover `total_steps`."""
    return max(1, math.ceil(total_steps / steps_per_epoch))


#: Names accepted by `get_strategy`.
STRATEGIES = ("default", "mirrored", "multiworker", "tpu")


def get_strategy(name: str = "default", tpu: str | None = None):
    """A `tf.distribute` strategy by name.

    Args:
      name: "default" (no distribution), "mirrored" (all local GPUs),
        "multiworker" (MultiWorkerMirroredStrategy; TF_CONFIG describes the
        cluster) or "tpu" (TPUStrategy).
      tpu: the TPU name or address for "tpu" (None: the local TPU / the one
        the environment names).

    Raises:
      ValueError: for an unknown name.
    """
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"Unknown strategy {name!r}; choose one of {STRATEGIES}.")


def parse_ints(text) -> tuple[int, ...]:
    """'30000,60000' (or a sequence) -> (30000, 60000)."""
    if isinstance(text, str):
        return tuple(int(float(v)) for v in text.split(",") if v.strip())
    return tuple(int(v) for v in text)


def parse_floats(text) -> tuple[float, ...]:
    """'30,70,90' (or a sequence) -> (30.0, 70.0, 90.0)."""
    if isinstance(text, str):
        return tuple(float(v) for v in text.split(",") if v.strip())
    return tuple(float(v) for v in text)


def collect_results(config, model, method, *, script, dense_model, test_loss, test_accuracy,
                    total_steps, pruning_schedule, epochs, data_source, timer, extra=None) -> dict:
    """The results dict shared by the CIFAR-10 and ImageNet scripts."""
    sparsity, active, dense_params = measured_sparsity(model, dense_model)
    flops = flops_ratios(
        model, method, delta_t=config.delta_t, multiplier=config.multiplier,
        dense_model=dense_model, pruning_schedule=pruning_schedule, total_steps=total_steps,
    )
    results = {
        "script": script,
        "method": method,
        "sparsity": 0.0 if method == "dense" else float(config.sparsity),
        "distribution": config.distribution,
        "seed": config.seed,
        "multiplier": float(config.multiplier),
        "epochs": float(epochs),
        "steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "total_steps": int(total_steps),
        "batch_size": config.batch_size,
        "delta_t": config.delta_t,
        "alpha": config.alpha,
        "test_accuracy": float(test_accuracy),
        "test_loss": float(test_loss),
        "measured_sparsity": float(sparsity),
        "active_params": int(active),
        "dense_params": int(dense_params),
        "inference_flops_ratio": flops["inference_flops_ratio"],
        "training_flops_ratio": flops["training_flops_ratio"],
        "data_source": data_source,
    }
    results.update(extra or {})
    results["wall_time_s"] = timer()
    return results
