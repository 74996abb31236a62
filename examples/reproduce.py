r"""Sweeps methods × sparsities × seeds on Fashion-MNIST and summarizes them like the paper.

For LeNet-300-100 (or the small ConvNet, --model=cnn) on Fashion-MNIST, trains
every method at every sparsity with every seed, then writes to --output_dir:

* results.csv: one row per run (all runs ever finished in this directory);
* results.md: mean ± std test accuracy with training and inference FLOPs per
  method and sparsity (the layout of the paper's Figure 2-left table);
* accuracy_vs_sparsity.png (cf. Figure 2 bottom-right) and
  accuracy_vs_training_flops.png;
* with --plot_connectivity, connectivity.png: active first-layer connections
  per input pixel before and after RigL training.

The sweep is resumable: a run whose results are already in results.csv or in
runs/<run>/results.json is not trained again, so an interrupted sweep picks
up where it stopped. Each run prints one line with the time left.

Dense is trained once per seed (its sparsity is 0) and shown in every column.

A quick version (about 2.5 minutes on 2 CPU cores), also spelled --quick:

    python examples/reproduce.py --methods=dense,static,set,rigl \
        --sparsities=0.9,0.98 --seeds=2 --epochs=5 --plot_connectivity \
        --output_dir=out/quick

The full default sweep (8 methods, S ∈ {0.8, 0.9, 0.95, 0.98}, 3 seeds,
10 epochs) is 87 runs, about 30–40 minutes on 2 CPU cores.

The official MNIST regime (`--preset=official_mnist`, see
`fashion_mnist.official_mnist_preset`: 200 epochs at lr 0.2 with the
official step drops, T_end = step 50000, fc1 at S, fc2 at 0.9·S, output
layer dense, pruning from step 2000 to 30000 every 500), about 5 minutes
per run on one CPU core:

    python examples/reproduce.py --preset=official_mnist \
        --methods=rigl,set,static,prune --sparsities=0.9,0.98 --seeds=2 \
        --output_dir=out/official_mnist

Flags given explicitly win over the preset (e.g. --epochs=2 for a smoke
test); --preset and --quick are exclusive.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import sys
import time

if __name__ == "__main__":  # `python examples/reproduce.py` from anywhere
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from absl import app, flags

from examples import common
from examples import fashion_mnist

__all__ = ["SweepConfig", "RunSpec", "plan", "execute", "sweep", "summarize", "define_flags"]

ALL_METHODS = ("dense", "static", "snip", "set", "snfs", "rigl", "prune", "small_dense")
METHOD_NAMES = {
    "dense": "Dense", "static": "Static", "snip": "SNIP", "set": "SET", "snfs": "SNFS",
    "rigl": "RigL", "prune": "Pruning", "small_dense": "Small-Dense",
}
MODEL_NAMES = {"mlp": "LeNet-300-100", "cnn": "small ConvNet"}

#: What --quick sets (flags given explicitly still win).
QUICK = dict(methods=("dense", "static", "set", "rigl"), sparsities=(0.9, 0.98), seeds=2,
             epochs=5.0, plot_connectivity=True)


@dataclasses.dataclass
class SweepConfig:
    """A sweep. Run-level hyperparameters are those of `fashion_mnist.Config`."""

    methods: tuple[str, ...] = ALL_METHODS
    sparsities: tuple[float, ...] = (0.8, 0.9, 0.95, 0.98)
    seeds: int = 3
    model: str = "mlp"
    epochs: float = 10.0
    batch_size: int = 100
    learning_rate: float = fashion_mnist.Config.learning_rate
    weight_decay: float = fashion_mnist.Config.weight_decay
    warmup_epochs: float = fashion_mnist.Config.warmup_epochs
    lr_schedule: str = "cosine"
    multiplier: float = 1.0
    distribution: str = "erk"
    delta_t: int = 100
    alpha: float = 0.3
    end_step: float = 0.75
    output_dir: str = "out/reproduce"
    data_dir: str | None = None
    train_limit: int = 0
    test_limit: int = 0
    plot_connectivity: bool = False
    verbose: int = 0
    small_dense_rule: str = "params"
    timing: str = "keras"
    preset: str = ""
    #: Train nothing: summarize the runs of the sweep that are already done.
    summarize_only: bool = False
    #: Fields that win over the preset (flags given explicitly).
    keep: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a sweep."""

    method: str
    sparsity: float
    seed: int


def define_flags(flag_values=flags.FLAGS) -> None:
    """Defines this script's flags (only when it runs as a program)."""
    d = SweepConfig()
    fv = flag_values
    flags.DEFINE_list("methods", list(d.methods), f"Methods to run, from {ALL_METHODS}.",
                      flag_values=fv)
    flags.DEFINE_list("sparsities", [str(s) for s in d.sparsities], "Sparsities S.",
                      flag_values=fv)
    flags.DEFINE_integer("seeds", d.seeds, "Number of seeds (0 .. seeds − 1).", flag_values=fv)
    flags.DEFINE_enum("model", d.model, sorted(fashion_mnist.MODELS),
                      "mlp: LeNet-300-100; cnn: the small ConvNet.", flag_values=fv)
    flags.DEFINE_float("epochs", d.epochs, "Training epochs per run at M = 1.", flag_values=fv)
    flags.DEFINE_integer("batch_size", d.batch_size, "Batch size.", flag_values=fv)
    flags.DEFINE_float("learning_rate", d.learning_rate, "Peak learning rate.", flag_values=fv)
    flags.DEFINE_float("weight_decay", d.weight_decay, "L2 weight decay of every kernel.",
                       flag_values=fv)
    flags.DEFINE_float("warmup_epochs", d.warmup_epochs, "Linear learning-rate warm-up epochs.",
                       flag_values=fv)
    flags.DEFINE_enum("lr_schedule", d.lr_schedule, ["cosine", "step", "constant"],
                      "Learning-rate schedule.", flag_values=fv)
    flags.DEFINE_float("multiplier", d.multiplier,
                       "Training multiplier M (steps, LR schedule and T_end).", flag_values=fv)
    flags.DEFINE_enum("distribution", d.distribution, ["uniform", "er", "erk"],
                      "Sparsity distribution.", flag_values=fv)
    flags.DEFINE_integer("delta_t", d.delta_t, "ΔT.", flag_values=fv)
    flags.DEFINE_float("alpha", d.alpha, "α.", flag_values=fv)
    flags.DEFINE_float("end_step", d.end_step, "T_end as a fraction of the run.", flag_values=fv)
    flags.DEFINE_string("output_dir", d.output_dir, "Where results go.", flag_values=fv)
    flags.DEFINE_string("data_dir", d.data_dir, "Directory with the Fashion-MNIST idx files.",
                        flag_values=fv)
    flags.DEFINE_integer("train_limit", d.train_limit, "First N training images only (0: all).",
                         flag_values=fv)
    flags.DEFINE_integer("test_limit", d.test_limit, "First N test images only (0: all).",
                         flag_values=fv)
    flags.DEFINE_bool("plot_connectivity", d.plot_connectivity,
                      "Plot RigL's first-layer connections per pixel before/after training.",
                      flag_values=fv)
    flags.DEFINE_integer("verbose", d.verbose, "Keras fit verbosity per run.", flag_values=fv)
    flags.DEFINE_enum("small_dense_rule", d.small_dense_rule,
                      list(fashion_mnist.SMALL_DENSE_RULES),
                      "How Small-Dense is sized (see fashion_mnist_mlp.py --help).",
                      flag_values=fv)
    flags.DEFINE_enum("timing", d.timing, ["keras", "official"],
                      "Update timing of the drop/grow callbacks (official needs "
                      "steps_per_execution 1; see fashion_mnist_mlp.py --help). No preset "
                      "changes it.", flag_values=fv)
    flags.DEFINE_enum("preset", None, sorted(fashion_mnist.PRESETS),
                      "Run every run in a preset regime (see fashion_mnist.PRESETS); "
                      "flags given explicitly win over it.", flag_values=fv)
    flags.DEFINE_bool("summarize_only", False,
                      "Train nothing: write results.csv, results.md and the plots from the "
                      "runs already in --output_dir (results.csv, runs/*/results.json; copy "
                      "runs/ of other output directories in to merge them).", flag_values=fv)
    flags.DEFINE_bool("quick", False,
                      "A ~2.5-minute sweep: " + ", ".join(
                          f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
                          for k, v in QUICK.items()) + " (flags given explicitly win).",
                      flag_values=fv)
    common.declare_main_key_flags(flag_values)


def config_from_flags(flag_values) -> SweepConfig:
    """A `SweepConfig` from parsed flags (with the --quick preset if asked for)."""
    config = common.config_from_flags(SweepConfig, flag_values)
    config.methods = tuple(m.strip().lower() for m in flag_values.methods if m.strip())
    config.sparsities = tuple(float(s) for s in flag_values.sparsities if s.strip())
    config.preset = flag_values.preset or ""
    if flag_values.quick and config.preset:
        raise ValueError("--quick and --preset are exclusive.")
    if flag_values.quick:
        for name, value in QUICK.items():
            if not flag_values[name].present:
                setattr(config, name, value)
    run_fields = {f.name for f in dataclasses.fields(fashion_mnist.Config)}
    config.keep = tuple(f.name for f in dataclasses.fields(SweepConfig)
                        if f.name in run_fields and f.name != "preset" and f.name in flag_values
                        and flag_values[f.name].present)
    return config


def plan(config: SweepConfig) -> list[RunSpec]:
    """The runs of a sweep, seed by seed (so early results cover every cell once).

    Raises:
      ValueError: for an unknown method or an empty sweep.
    """
    unknown = sorted(set(config.methods) - set(ALL_METHODS))
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {ALL_METHODS}.")
    if not config.methods or config.seeds < 1:
        raise ValueError("Nothing to run: give at least one method and --seeds >= 1.")
    if not config.sparsities and any(m != "dense" for m in config.methods):
        raise ValueError("Give at least one sparsity.")
    runs = []
    for seed in range(config.seeds):
        for method in config.methods:
            if method == "dense":
                runs.append(RunSpec("dense", 0.0, seed))
                continue
            runs.extend(RunSpec(method, float(s), seed) for s in config.sparsities)
    return runs


def _resolved_config(config: SweepConfig, spec: RunSpec) -> fashion_mnist.Config:
    """The run's `fashion_mnist.Config` (preset applied), without an output directory."""
    run = fashion_mnist.Config(
        model=config.model, method=spec.method, sparsity=spec.sparsity,
        distribution=config.distribution, epochs=config.epochs,
        batch_size=config.batch_size, learning_rate=config.learning_rate,
        weight_decay=config.weight_decay, warmup_epochs=config.warmup_epochs,
        lr_schedule=config.lr_schedule, delta_t=config.delta_t, alpha=config.alpha,
        end_step=config.end_step, multiplier=config.multiplier, seed=spec.seed,
        data_dir=config.data_dir, train_limit=config.train_limit,
        test_limit=config.test_limit, verbose=config.verbose,
        small_dense_rule=config.small_dense_rule, timing=config.timing,
    )
    run = fashion_mnist.apply_preset(run, config.preset, keep=config.keep)
    if run.timing == "official":
        run.steps_per_execution = 1  # the official timing updates around single batches
    return run


def run_config(config: SweepConfig, spec: RunSpec) -> fashion_mnist.Config:
    """The `fashion_mnist.Config` of one run of the sweep."""
    return dataclasses.replace(
        _resolved_config(config, spec),
        output_dir=os.path.join(config.output_dir, "runs", run_id(config, spec)))


#: Config fields that do not affect a run's result (or are in its readable name).
_NOT_HASHED = ("output_dir", "data_dir", "verbose", "seed", "method", "sparsity", "model",
               "multiplier", "epochs", "preset")


#: Fields added after the first preset sweeps: hashed only away from these
#: values, so that earlier runs keep their ids.
_HASHED_UNLESS = {"timing": "keras"}


def run_id(config: SweepConfig, spec: RunSpec) -> str:
    """A name for a run that changes whenever anything that affects its result does."""
    if config.preset:
        run = _resolved_config(config, spec)
        readable = (
            f"{config.model}-{spec.method}-{config.preset}-s{spec.sparsity:g}"
            f"-m{run.multiplier:g}-e{run.epochs:g}-seed{spec.seed}"
        )
        rest = tuple((f.name, getattr(run, f.name)) for f in dataclasses.fields(run)
                     if f.name not in _NOT_HASHED
                     and _HASHED_UNLESS.get(f.name, object()) != getattr(run, f.name))
        return f"{readable}-{hashlib.sha1(repr(rest).encode()).hexdigest()[:6]}"
    readable = (
        f"{config.model}-{spec.method}-{config.distribution}-s{spec.sparsity:g}"
        f"-m{config.multiplier:g}-e{config.epochs:g}-seed{spec.seed}"
    )
    rest = (config.batch_size, config.learning_rate, config.lr_schedule, config.delta_t,
            config.alpha, config.end_step, config.train_limit, config.test_limit,
            config.weight_decay, config.warmup_epochs)
    if config.small_dense_rule != "params" and spec.method == "small_dense":
        rest += (config.small_dense_rule,)
    if config.timing != "keras":
        rest += (config.timing,)
    digest = hashlib.sha1(repr(rest).encode()).hexdigest()[:6]
    return f"{readable}-{digest}"


# ---------------------------------------------------------------------------
# Results store
# ---------------------------------------------------------------------------

_FIRST_COLUMNS = ("run_id",) + common.RESULT_KEYS


def _parse_cell(text: str):
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def load_results(output_dir: str) -> dict[str, dict]:
    """{run_id: results} from results.csv and runs/*/results.json in `output_dir`."""
    rows: dict[str, dict] = {}
    path = os.path.join(output_dir, "results.csv")
    if os.path.exists(path):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("run_id"):
                    rows[row["run_id"]] = {k: _parse_cell(v) for k, v in row.items()}
    runs_dir = os.path.join(output_dir, "runs")
    if os.path.isdir(runs_dir):
        for name in sorted(os.listdir(runs_dir)):
            if name not in rows:
                results = common.read_results(os.path.join(runs_dir, name, "results.json"))
                if results is not None:
                    rows[name] = {"run_id": name, **results}
    return rows


def write_csv(output_dir: str, rows: dict[str, dict]) -> str:
    """Writes every row to output_dir/results.csv (atomically); returns its path."""
    columns = ["run_id"]
    for row in [dict.fromkeys(_FIRST_COLUMNS)] + list(rows.values()):
        columns += [k for k in row if k not in columns]
    # Only columns some run has a value in (the experiment's own keys).
    columns = [c for c in columns
               if c == "run_id" or any(row.get(c) is not None for row in rows.values())]
    path = os.path.join(output_dir, "results.csv")
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for key in sorted(rows):
            writer.writerow({k: rows[key].get(k, "") for k in columns})
    os.replace(tmp, path)
    return path


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def execute(config, runs: list[RunSpec], *, key, make_run, load_run_fn, describe,
            summarize_fn, run_fn=None, log=print) -> dict:
    """The resumable loop of a sweep (this script's and examples/reproduce_char_lm.py's).

    Args:
      config: the sweep; reads `output_dir` and `summarize_only`.
      runs: the runs of the sweep, in order.
      key: RunSpec -> run id (the name of its directory under runs/).
      make_run: RunSpec -> the run's config, passed to run_fn.
      load_run_fn: () -> run_fn, called once and only if a run is left to train
        (it loads the data).
      describe: results dict -> a short text of its main numbers.
      summarize_fn: (rows) -> {name: path} of the files it wrote.
      run_fn: run config -> results dict, instead of `load_run_fn()` (tests).
      log: where progress lines go.

    Returns:
      {"rows": results of this sweep's runs, "new_runs": how many were
      trained now, "files": what summarize_fn wrote}.
    """
    os.makedirs(config.output_dir, exist_ok=True)
    stored = load_results(config.output_dir)
    todo = [spec for spec in runs if key(spec) not in stored]
    if config.summarize_only:
        log(f"{len(runs)} runs in the sweep, {len(runs) - len(todo)} done; summarizing those"
            + (f" ({len(todo)} missing: "
               + ", ".join(f"{s.method} S={s.sparsity:g} seed {s.seed}" for s in todo) + ")"
               if todo else ""))
        runs = [spec for spec in runs if key(spec) in stored]
        if stored:
            write_csv(config.output_dir, stored)
        rows = [stored[key(spec)] for spec in runs]
        return {"rows": rows, "new_runs": 0, "files": summarize_fn(rows)}
    log(f"{len(runs)} runs in the sweep, {len(runs) - len(todo)} already done, "
        f"{len(todo)} to run; results in {config.output_dir}")
    if run_fn is None and todo:
        run_fn = load_run_fn()  # loads the data once; fails early if it is missing

    start, done_now = time.time(), 0
    for index, spec in enumerate(runs, 1):
        name = key(spec)
        label = (f"[{index:>{len(str(len(runs)))}}/{len(runs)}] {spec.method:<11} "
                 f"S={spec.sparsity:<5g} seed={spec.seed}")
        if name in stored:
            log(f"{label}  done before: {describe(stored[name])}")
            continue
        results = run_fn(make_run(spec))
        # Rows another sweep in the same directory finished meanwhile are kept.
        stored = {**load_results(config.output_dir), **stored, name: {"run_id": name, **results}}
        write_csv(config.output_dir, stored)
        done_now += 1
        elapsed = time.time() - start
        eta = elapsed / done_now * (len(todo) - done_now)
        log(f"{label}  {describe(results)} "
            f"train FLOPs={float(results['training_flops_ratio']):.3f}x "
            f"({float(results['wall_time_s']):.0f}s) | elapsed {_clock(elapsed)}, "
            f"ETA {_clock(eta)}")
    if not todo and stored:
        write_csv(config.output_dir, stored)  # e.g. rows only in runs/*: put them in the CSV
    rows = [stored[key(spec)] for spec in runs]
    return {"rows": rows, "new_runs": done_now, "files": summarize_fn(rows)}


def sweep(config: SweepConfig, *, run_fn=None, log=print) -> dict:
    """Runs every run of `config` that is not finished yet, then summarizes.

    Args:
      config: the sweep.
      run_fn: fashion_mnist.Config -> results dict (default: train it; tests
        may substitute a fake).
      log: where progress lines go.

    Returns:
      {"rows": results of this sweep's runs, "new_runs": how many were
      trained now, "files": paths written by `summarize`}.
    """

    def load_run_fn():
        import keras

        from examples import data as data_lib

        dataset = data_lib.load_fashion_mnist(config.data_dir)

        def train(run_cfg):
            keras.backend.clear_session()  # keep memory flat over many runs
            return fashion_mnist.train_and_evaluate(run_cfg, dataset)

        return train

    return execute(
        config, plan(config), key=lambda spec: run_id(config, spec),
        make_run=lambda spec: run_config(config, spec), load_run_fn=load_run_fn,
        describe=lambda r: f"acc={float(r['test_accuracy']):.4f}",
        summarize_fn=lambda rows: summarize(config, rows, log=log), run_fn=run_fn, log=log)


# ---------------------------------------------------------------------------
# Summary: table and plots
# ---------------------------------------------------------------------------


def _aggregate(config: SweepConfig, rows: list[dict], metric: str = "test_accuracy") -> dict:
    """{(method, sparsity): stats of `metric`} with dense copied to every sparsity."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], float(row["sparsity"])), []).append(row)
    stats = {}
    for (method, sparsity), members in groups.items():
        acc = np.array([float(r[metric]) for r in members])
        entry = {
            "mean": float(acc.mean()),
            "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "n": len(acc),
            "train_flops": float(np.mean([float(r["training_flops_ratio"]) for r in members])),
            "test_flops": float(np.mean([float(r["inference_flops_ratio"]) for r in members])),
            "measured_sparsity": float(np.mean([float(r["measured_sparsity"]) for r in members])),
        }
        if method == "dense":
            for s in config.sparsities:
                stats["dense", float(s)] = entry
        else:
            stats[method, sparsity] = entry
    return stats


def _seed_text(config: SweepConfig, rows: list[dict]) -> str:
    seeds = sorted({int(r["seed"]) for r in rows if r.get("seed") is not None})
    counts = {}
    for r in rows:
        key = (r["method"], float(r["sparsity"]))
        counts[key] = counts.get(key, 0) + 1
    if not seeds or (len(seeds) == config.seeds and len(set(counts.values())) <= 1):
        return f"{config.seeds} seed(s)"
    return (f"the seeds present (seeds {', '.join(map(str, seeds))}; "
            f"{min(counts.values())} to {max(counts.values())} per cell)")


def settings_line(config: SweepConfig, steps=()) -> str:
    """One line describing the runs' hyperparameters (the resolved preset if any)."""
    steps = f" ({', '.join(map(str, steps))} steps)" if steps else ""
    if config.preset:
        sparse = [m for m in config.methods if m not in ("dense", "small_dense")]
        run = _resolved_config(config, RunSpec(sparse[0] if sparse else config.methods[0], 0.5, 0))
        scales = ", ".join(f"{k} at S" if v == 1 else f"{k} at {v:g}·S"
                           for k, v in run.sparsity_scales)
        dense = ", ".join(run.dense_layers)
        dense_drops = fashion_mnist.apply_preset(
            dataclasses.replace(run, method="dense"), config.preset,
            keep=config.keep).lr_drop_epochs
        return (
            f"Settings ({config.preset} preset): {run.epochs:g} epochs × M = "
            f"{run.multiplier:g}{steps}, batch {run.batch_size}, SGD Nesterov momentum "
            f"{run.momentum:g}, lr {run.learning_rate:g} ÷{run.lr_drop_factor:g} at epochs "
            f"{', '.join(f'{e:g}' for e in run.lr_drop_epochs)} (dense: "
            f"{', '.join(f'{e:g}' for e in dense_drops)}), weight decay "
            f"{run.weight_decay:g}; per-layer sparsity {scales}"
            + (f", {dense} dense" if dense else "")
            + f"; ΔT = {run.delta_t}, α = {run.alpha:g} ({run.decay}), T_end = step "
            f"{run.end_step}; pruning from step {run.prune_begin_step} to "
            f"{run.prune_end_step} every {run.prune_frequency} steps; "
            f"{run.timing} update timing; steps_per_execution {run.steps_per_execution}.")
    return (
        f"Settings: {config.epochs:g} epochs × M = {config.multiplier:g}{steps}, "
        f"batch {config.batch_size}, "
        f"SGD Nesterov lr {config.learning_rate:g} ({config.lr_schedule}"
        + (f", {config.warmup_epochs:g} warm-up epochs" if config.warmup_epochs else "")
        + f"), weight decay {config.weight_decay:g}, "
        f"{config.distribution.upper()} sparsity distribution, ΔT = {config.delta_t}, "
        f"α = {config.alpha:g}, T_end = {config.end_step:g} of the run"
        + (f", {config.timing} update timing." if config.timing != "keras" else "."))


def markdown_table(config: SweepConfig, rows: list[dict]) -> str:
    """The results as markdown: accuracy (mean ± std) and FLOPs per method and sparsity."""
    stats = _aggregate(config, rows)
    sparsities = [float(s) for s in config.sparsities]
    model = MODEL_NAMES.get(config.model, config.model)
    steps = sorted({int(r["steps"]) for r in rows if r.get("steps") is not None})
    lines = [
        f"# {model} on Fashion-MNIST: sparse training methods",
        "",
        f"Test accuracy (%) as mean ± std over {_seed_text(config, rows)}; FLOPs relative to the "
        "dense model: training FLOPs per the paper's Appendix A (× M), inference FLOPs per "
        "sample.",
        settings_line(config, steps),
        "",
    ]
    header = ["Method"]
    for s in sparsities:
        header += [f"S={s:g} acc", "train", "test"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for method in config.methods:
        cells = [METHOD_NAMES.get(method, method)]
        for s in sparsities:
            entry = stats.get((method, s))
            if entry is None:
                cells += ["—", "—", "—"]
                continue
            acc = f"{100 * entry['mean']:.2f}"
            if entry["n"] > 1:
                acc += f" ± {100 * entry['std']:.2f}"
            cells += [acc, f"{entry['train_flops']:.3f}x", f"{entry['test_flops']:.3f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Columns per sparsity: test accuracy, training FLOPs, inference (test) FLOPs.",
        "",
    ]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def plot_accuracy_vs_sparsity(config: SweepConfig, rows: list[dict], path: str) -> str:
    """Mean test accuracy (± std) against sparsity, one line per method; dense dashed."""
    plt = _plt()
    stats = _aggregate(config, rows)
    sparsities = sorted(float(s) for s in config.sparsities)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for method in config.methods:
        points = [(s, stats[method, s]) for s in sparsities if (method, s) in stats]
        if not points:
            continue
        if method == "dense":
            entry = points[0][1]
            axes.axhline(100 * entry["mean"], color="red", linestyle="--", linewidth=1,
                         label="Dense")
            continue
        xs = [p[0] for p in points]
        axes.errorbar(xs, [100 * p[1]["mean"] for p in points],
                      yerr=[100 * p[1]["std"] for p in points], marker="o", capsize=3,
                      label=METHOD_NAMES.get(method, method))
    axes.set_xticks(sparsities)
    axes.set_xticklabels([f"{s:g}" for s in sparsities])
    axes.set_xlabel("sparsity")
    axes.set_ylabel("test accuracy (%)")
    regime = (f"{config.preset} preset" if config.preset else
              f"{config.distribution.upper()}, {config.epochs:g} epochs × {config.multiplier:g}")
    axes.set_title(f"{MODEL_NAMES.get(config.model, config.model)} / Fashion-MNIST ({regime})")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_accuracy_vs_flops(config: SweepConfig, rows: list[dict], path: str, *,
                           metric: str = "test_accuracy", scale: float = 100.0,
                           ylabel: str = "test accuracy (%)", title: str | None = None) -> str:
    """Mean `metric` × `scale` (± std) against training FLOPs (log scale), points per sparsity."""
    plt = _plt()
    stats = _aggregate(config, rows, metric)
    sparsities = sorted(float(s) for s in config.sparsities)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for method in config.methods:
        points = [stats[method, s] for s in sparsities if (method, s) in stats]
        if not points:
            continue
        if method == "dense":
            axes.axhline(scale * points[0]["mean"], color="red", linestyle="--", linewidth=1)
            axes.plot([points[0]["train_flops"]], [scale * points[0]["mean"]], "r*",
                      markersize=10, label="Dense")
            continue
        axes.errorbar([p["train_flops"] for p in points], [scale * p["mean"] for p in points],
                      yerr=[scale * p["std"] for p in points], marker="o", capsize=3,
                      label=METHOD_NAMES.get(method, method))
    axes.set_xscale("log")
    axes.set_xlabel("training FLOPs (× dense training)")
    axes.set_ylabel(ylabel)
    axes.set_title(title or ("Accuracy vs training cost (points: sparsities "
                             + ", ".join(f"{s:g}" for s in sparsities) + ")"), fontsize=10)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def center_share(counts: np.ndarray) -> float:
    """Fraction of the connections that read the central 14×14 pixels of a 28×28 image."""
    image = np.asarray(counts, dtype="float64").reshape(28, 28)
    total = image.sum()
    return float(image[7:21, 7:21].sum() / total) if total else 0.0


def plot_connectivity(config: SweepConfig, path: str, log=print) -> str | None:
    """Heatmaps of first-layer connections per pixel: before and after RigL (and SET).

    Uses the RigL run of the first seed at the highest sparsity of the sweep.
    Returns the path, or None if there is no such run with saved connectivity.
    """
    if config.model != "mlp":
        log("--plot_connectivity needs --model=mlp (a Dense first layer); skipped.")
        return None
    if "rigl" not in config.methods or not config.sparsities:
        log("--plot_connectivity needs rigl in --methods; skipped.")
        return None
    sparsity = max(float(s) for s in config.sparsities)

    def load(method):
        directory = os.path.join(config.output_dir, "runs",
                                 run_id(config, RunSpec(method, sparsity, 0)))
        try:
            with np.load(os.path.join(directory, "connectivity.npz")) as saved:
                return saved["before"], saved["after"]
        except OSError:
            return None

    rigl = load("rigl")
    if rigl is None:
        log("No saved connectivity for the RigL run; skipped.")
        return None
    panels = [("initial (random)", rigl[0]), ("after RigL", rigl[1])]
    other = load("set") if "set" in config.methods else None
    if other is not None:
        panels.append(("after SET", other[1]))
    plt = _plt()
    vmax = max(float(np.max(c)) for _, c in panels)
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 0.8, 3.8))
    for ax, (title, counts) in zip(np.atleast_1d(axes), panels):
        image = ax.imshow(np.asarray(counts).reshape(28, 28), cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"{title}\ncenter 14×14: {100 * center_share(counts):.0f}% of links",
                     fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    figure.colorbar(image, ax=list(np.atleast_1d(axes)), shrink=0.8,
                    label="active connections from the pixel")
    figure.suptitle(f"LeNet-300-100 first layer, S = {sparsity:g} "
                    f"({config.distribution.upper()})", fontsize=10)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    log(f"connectivity: center 14×14 pixels hold {100 * center_share(rigl[0]):.1f}% of the "
        f"first-layer connections before and {100 * center_share(rigl[1]):.1f}% after RigL "
        "(the central quarter of the image).")
    return path


def summarize(config: SweepConfig, rows: list[dict], log=print) -> dict:
    """Writes results.md and the plots for `rows`; returns {name: path}."""
    files = {}
    if not rows:
        return files
    table = markdown_table(config, rows)
    files["markdown"] = os.path.join(config.output_dir, "results.md")
    with open(files["markdown"], "w") as f:
        f.write(table)
    files["csv"] = os.path.join(config.output_dir, "results.csv")
    files["accuracy_vs_sparsity"] = plot_accuracy_vs_sparsity(
        config, rows, os.path.join(config.output_dir, "accuracy_vs_sparsity.png"))
    files["accuracy_vs_flops"] = plot_accuracy_vs_flops(
        config, rows, os.path.join(config.output_dir, "accuracy_vs_training_flops.png"))
    if config.plot_connectivity:
        path = plot_connectivity(config, os.path.join(config.output_dir, "connectivity.png"),
                                 log=log)
        if path:
            files["connectivity"] = path
    log("\n" + table)
    log("wrote " + ", ".join(sorted(files.values())))
    return files


def main(argv):
    del argv  # unused
    sweep(config_from_flags(flags.FLAGS), log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    define_flags()
    app.run(main)
