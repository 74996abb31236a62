r"""Sweeps the sparse GRU character language model: methods × sparsities × seeds.

The paper's language-modelling comparison at laptop scale: every method of
`examples/char_lm.py` at S ∈ {0.75, 0.9} (the talk's sparsities) with every
seed, then writes to --output_dir:

* results.csv: one row per run (all runs ever finished in this directory);
* results.md: mean ± std held-out bits per character (lower is better) with
  training and inference FLOPs per method and sparsity;
* bpc_vs_training_flops.png: bits per character against training FLOPs.

Resumable like examples/reproduce.py (whose loop it shares): finished runs
are read back from results.csv or runs/<run>/results.json, not trained
again. Dense is trained once per seed.

The default sweep (8 methods, 2 sparsities, 3 seeds, 2000 steps of the
default small GRU on the King James Bible) is 45 runs of 2–4 minutes each on
one CPU core:

    python examples/reproduce_char_lm.py --output_dir=out/char_lm

Two sweeps over disjoint --seeds_from/--seeds ranges in one --output_dir can
run side by side (one per core); --summarize_only then tabulates them all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys

if __name__ == "__main__":  # `python examples/reproduce_char_lm.py` from anywhere
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from examples import char_lm
from examples import common
from examples import reproduce

__all__ = ["CharSweepConfig", "define_flags", "config_from_flags", "plan", "run_config",
           "run_id", "sweep", "markdown_table", "summarize"]


@dataclasses.dataclass
class CharSweepConfig:
    """A character-LM sweep. Run-level fields are those of `char_lm.Config`."""

    methods: tuple[str, ...] = char_lm.METHODS
    sparsities: tuple[float, ...] = (0.75, 0.9)
    seeds: int = 3
    #: First seed: the sweep runs seeds seeds_from .. seeds_from + seeds − 1.
    seeds_from: int = 0
    steps: int = char_lm.Config.steps
    units: int = char_lm.Config.units
    embedding_dim: int = char_lm.Config.embedding_dim
    seq_len: int = char_lm.Config.seq_len
    batch_size: int = char_lm.Config.batch_size
    learning_rate: float = char_lm.Config.learning_rate
    distribution: str = char_lm.Config.distribution
    delta_t: int = char_lm.Config.delta_t
    alpha: float = char_lm.Config.alpha
    end_step: float = char_lm.Config.end_step
    source: str = char_lm.Config.source
    data_dir: str | None = None
    max_chars: int = 0
    eval_chars: int = 0
    output_dir: str = "out/char_lm"
    verbose: int = 0
    summarize_only: bool = False


#: CharSweepConfig fields that are not run settings.
_SWEEP_ONLY = ("methods", "sparsities", "seeds", "seeds_from", "output_dir", "summarize_only")


def define_flags(flag_values=flags.FLAGS) -> None:
    """Defines this script's flags (only when it runs as a program)."""
    d, fv = CharSweepConfig(), flag_values
    flags.DEFINE_list("methods", list(d.methods), f"Methods, from {char_lm.METHODS}.",
                      flag_values=fv)
    flags.DEFINE_list("sparsities", [str(s) for s in d.sparsities], "Sparsities S.",
                      flag_values=fv)
    flags.DEFINE_integer("seeds", d.seeds, "Number of seeds.", flag_values=fv)
    flags.DEFINE_integer("seeds_from", d.seeds_from, "First seed.", flag_values=fv)
    for name, kind in (("steps", "integer"), ("units", "integer"),
                       ("embedding_dim", "integer"), ("seq_len", "integer"),
                       ("batch_size", "integer"), ("learning_rate", "float"),
                       ("delta_t", "integer"), ("alpha", "float"), ("end_step", "float"),
                       ("max_chars", "integer"), ("eval_chars", "integer"),
                       ("verbose", "integer")):
        getattr(flags, f"DEFINE_{kind}")(
            name, getattr(d, name), f"As examples/char_lm.py --{name}.", flag_values=fv)
    flags.DEFINE_enum("distribution", d.distribution, ["uniform", "er", "erk"],
                      "Sparsity distribution.", flag_values=fv)
    flags.DEFINE_string("source", d.source, "Corpus (see examples/text_data.py).",
                        flag_values=fv)
    flags.DEFINE_string("data_dir", d.data_dir, "As examples/char_lm.py --data_dir.",
                        flag_values=fv)
    flags.DEFINE_string("output_dir", d.output_dir, "Where results go.", flag_values=fv)
    flags.DEFINE_bool("summarize_only", False,
                      "Train nothing: tabulate and plot the runs already in --output_dir.",
                      flag_values=fv)
    common.declare_main_key_flags(fv)


def config_from_flags(flag_values) -> CharSweepConfig:
    """A `CharSweepConfig` from parsed flags."""
    config = common.config_from_flags(CharSweepConfig, flag_values)
    config.methods = tuple(m.strip().lower() for m in flag_values.methods if m.strip())
    config.sparsities = tuple(float(s) for s in flag_values.sparsities if s.strip())
    return config


def plan(config: CharSweepConfig) -> list[reproduce.RunSpec]:
    """The runs, seed by seed (see `reproduce.plan`), from seed `seeds_from` on.

    Raises:
      ValueError: for an unknown method, a negative first seed or an empty sweep.
    """
    if config.seeds_from < 0:
        raise ValueError(f"`seeds_from` must be >= 0; got {config.seeds_from}.")
    return [dataclasses.replace(spec, seed=spec.seed + config.seeds_from)
            for spec in reproduce.plan(config)]


def run_config(config: CharSweepConfig, spec: reproduce.RunSpec) -> char_lm.Config:
    """The `char_lm.Config` of one run, writing to runs/<run_id>."""
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                if f.name not in _SWEEP_ONLY}
    return char_lm.Config(
        method=spec.method, sparsity=spec.sparsity, seed=spec.seed, **settings,
        output_dir=os.path.join(config.output_dir, "runs", run_id(config, spec)))


def run_id(config: CharSweepConfig, spec: reproduce.RunSpec) -> str:
    """A name that changes whenever anything that affects the run's result does."""
    settings = tuple((f.name, getattr(config, f.name)) for f in dataclasses.fields(config)
                     if f.name not in _SWEEP_ONLY + ("verbose", "data_dir"))
    digest = hashlib.sha1(repr(settings).encode()).hexdigest()[:6]
    return (f"charlm-{spec.method}-{config.distribution}-s{spec.sparsity:g}-"
            f"steps{config.steps}-seed{spec.seed}-{digest}")


def sweep(config: CharSweepConfig, *, run_fn=None, log=print) -> dict:
    """Trains every run of `config` not finished yet, then summarizes.

    Args:
      config: the sweep.
      run_fn: char_lm.Config -> results dict (default: train it; tests may
        substitute a fake).
      log: where progress lines go.

    Returns:
      As `reproduce.execute`.
    """

    def load_run_fn():
        import keras

        data = char_lm.load_data(run_config(config, plan(config)[0]))

        def train(run_cfg):
            keras.backend.clear_session()  # keep memory flat over many runs
            return char_lm.run(run_cfg, data)

        return train

    return reproduce.execute(
        config, plan(config), key=lambda spec: run_id(config, spec),
        make_run=lambda spec: run_config(config, spec), load_run_fn=load_run_fn,
        describe=lambda r: f"bpc={float(r['bits_per_character']):.4f}",
        summarize_fn=lambda rows: summarize(config, rows, log=log), run_fn=run_fn, log=log)


def _settings_line(config: CharSweepConfig, rows: list[dict]) -> str:
    chars = sorted({int(r["train_chars"]) for r in rows if r.get("train_chars")})
    evals = sorted({int(r["eval_chars"]) for r in rows if r.get("eval_chars")})
    return (
        f"Settings: GRU {config.units} units, embedding {config.embedding_dim}, "
        f"{config.seq_len}-character windows, batch {config.batch_size}, {config.steps} steps, "
        f"Adam {config.learning_rate:g} (cosine), global clipnorm 1, "
        f"{config.distribution.upper()} over the GRU kernels and the output layer, "
        f"ΔT = {config.delta_t}, α = {config.alpha:g}, T_end = {config.end_step:g} of the run; "
        f"corpus {config.source}"
        + (f" ({', '.join(map(str, chars))} training characters" if chars else "")
        + (f", BPC over {', '.join(map(str, evals))} held-out characters)" if evals else
           (")" if chars else "")) + ".")


def markdown_table(config: CharSweepConfig, rows: list[dict]) -> str:
    """Bits per character (mean ± std) and FLOPs per method and sparsity, as markdown."""
    stats = reproduce._aggregate(config, rows, "bits_per_character")
    sparsities = [float(s) for s in config.sparsities]
    lines = [
        "# Sparse GRU character language model",
        "",
        f"Held-out bits per character (lower is better) as mean ± std over "
        f"{reproduce._seed_text(config, rows)}; FLOPs relative to the dense model: training "
        "FLOPs per the paper's Appendix A, inference FLOPs per character.",
        _settings_line(config, rows),
        "",
    ]
    header = ["Method"]
    for s in sparsities:
        header += [f"S={s:g} BPC", "train", "test"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for method in config.methods:
        cells = [reproduce.METHOD_NAMES.get(method, method)]
        for s in sparsities:
            entry = stats.get((method, s))
            if entry is None:
                cells += ["—", "—", "—"]
                continue
            bpc = f"{entry['mean']:.3f}" + (f" ± {entry['std']:.3f}" if entry["n"] > 1 else "")
            cells += [bpc, f"{entry['train_flops']:.3f}x", f"{entry['test_flops']:.3f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Columns per sparsity: bits per character, training FLOPs, inference FLOPs.",
              ""]
    return "\n".join(lines)


def summarize(config: CharSweepConfig, rows: list[dict], log=print) -> dict:
    """Writes results.md and bpc_vs_training_flops.png for `rows`; returns {name: path}."""
    if not rows:
        return {}
    table = markdown_table(config, rows)
    files = {"markdown": os.path.join(config.output_dir, "results.md"),
             "csv": os.path.join(config.output_dir, "results.csv")}
    with open(files["markdown"], "w") as f:
        f.write(table)
    files["bpc_vs_flops"] = reproduce.plot_accuracy_vs_flops(
        config, rows, os.path.join(config.output_dir, "bpc_vs_training_flops.png"),
        metric="bits_per_character", scale=1.0, ylabel="held-out bits per character",
        title="GRU character LM: BPC vs training cost (points: S = "
              + ", ".join(f"{s:g}" for s in config.sparsities) + ")")
    log("\n" + table)
    log("wrote " + ", ".join(sorted(files.values())))
    return files


def main(argv):
    del argv  # unused
    sweep(config_from_flags(flags.FLAGS), log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    define_flags()
    app.run(main)
