r"""A sparse GRU character language model: the paper's language-modelling experiment.

Embedding -> GRU -> Dense (softmax over the characters), trained with RigL or
any baseline on a character corpus, evaluated in bits per character (BPC)
on held-out text. Writes results.json to --output_dir.

    python examples/char_lm.py --method=rigl --sparsity=0.75 --steps=2000 \
        --output_dir=/tmp/char_lm_rigl

What is masked: the GRU's input kernel ("gru/gru_cell/kernel"), its
recurrent kernel ("gru/gru_cell/recurrent_kernel") and the output layer
("logits"); the embedding stays dense (rigl_keras's default), as do biases.
--sparsity is the overall sparsity of those three matrices, spread by
--distribution.

The paper. RigL (Evci et al., 2020) reports character-level language
modelling on WikiText-103 with a GRU model "similar to WaveRNN"
(Kalchbrenner et al., 2018), and finds that RigL falls short of matching
magnitude pruning there (talk slides, shared/paper/rigl-slides.txt). The
excerpt of the paper in shared/paper has no hyperparameters; recalled from
the published appendix (verify before quoting): embedding 128, one GRU of
512 units, a WaveRNN-style readout, Adam, sparsity 75% and 90%, hundreds of
thousands of steps. Paper-like flags:

    --units=512 --embedding_dim=128 --seq_len=512 --batch_size=32 \
    --learning_rate=7e-4 --steps=500000 --sparsity=0.75

(WikiText-103 itself is not in TFDS and cannot be downloaded here; see
examples/text_data.py.) The defaults below are small so that `--steps 2000`
finishes in a few minutes on two CPU cores: 128 GRU units, 32-d embedding,
64-character windows, batch 32, Adam at 2e-3 with a cosine decay, gradient
norm clipped at 1.

The sweep over methods, sparsities and seeds is examples/reproduce_char_lm.py;
its measured table and plot (RigL against pruning, as in the talk) are in
docs/results.md.

Data: examples/text_data.py. --source=auto uses the King James Bible from
Debian's `bible-kjv` package (`make text-data`), split 90/5/5 by position;
--source=file --data_dir=PATH uses any UTF-8 text file.

Training samples random 64-character windows (each starting from a zero GRU
state; the data order follows --seed). Evaluation runs over consecutive
non-overlapping windows of the held-out split (also from a zero state) and
reports the mean cross-entropy in bits: BPC = nats / ln 2.

FLOPs come from `rigl_keras.flops` (the model has a fixed --seq_len input
for that): 2 per active weight of the GRU kernels and the output layer per
character; the embedding lookup is free.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

if __name__ == "__main__":  # `python examples/char_lm.py` from anywhere
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras
import numpy as np

from examples import common
from examples import text_data

__all__ = [
    "Config",
    "METHODS",
    "char_gru",
    "define_flags",
    "load_data",
    "build_method",
    "make_optimizer",
    "train_dataset",
    "eval_windows",
    "bits_per_character",
    "sparsifiable_counts",
    "run",
    "train_and_evaluate",
    "main",
]

#: The methods of `rigl_keras.baselines`, in the paper's order.
METHODS = ("dense", "static", "snip", "set", "snfs", "rigl", "prune", "small_dense")


@dataclasses.dataclass
class Config:
    """One character-LM training run. Fields mirror the script's flags."""

    method: str = "rigl"
    sparsity: float = 0.75
    distribution: str = "erk"
    seed: int = 0
    steps: int = 2000
    units: int = 128
    embedding_dim: int = 32
    seq_len: int = 64
    batch_size: int = 32
    learning_rate: float = 2e-3
    lr_schedule: str = "cosine"
    clipnorm: float = 1.0
    delta_t: int = 100
    alpha: float = 0.3
    decay: str = "cosine"
    end_step: float = 0.75
    prune_begin_step: float = 0.0
    prune_end_step: float = 0.75
    prune_frequency: int = 100
    source: str = "auto"
    data_dir: str | None = None
    max_chars: int = 0
    eval_split: str = "valid"
    eval_chars: int = 0
    output_dir: str | None = None
    verbose: int = 0


def define_flags(flag_values=None) -> None:
    """Defines this script's flags (only when it runs as a program)."""
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values  # an empty FlagValues is falsy
    d = Config()
    # The method and schedule flags shared with the Fashion-MNIST scripts.
    common.define_method_flags(
        fv, multiplier=False, method=d.method, sparsity=d.sparsity,
        distribution=d.distribution, seed=d.seed, delta_t=d.delta_t, alpha=d.alpha,
        decay=d.decay, output_dir=d.output_dir)
    common.define_schedule_flags(
        fv, end_step=d.end_step, prune_begin_step=d.prune_begin_step,
        prune_end_step=d.prune_end_step, prune_frequency=d.prune_frequency)
    flags.DEFINE_integer("steps", d.steps, "Training steps.", flag_values=fv)
    flags.DEFINE_integer("units", d.units, "GRU units (Small-Dense scales them).",
                         flag_values=fv)
    flags.DEFINE_integer("embedding_dim", d.embedding_dim, "Character embedding size.",
                         flag_values=fv)
    flags.DEFINE_integer("seq_len", d.seq_len, "Characters per training window.",
                         flag_values=fv)
    flags.DEFINE_integer("batch_size", d.batch_size, "Windows per batch.", flag_values=fv)
    flags.DEFINE_float("learning_rate", d.learning_rate, "Peak Adam learning rate.",
                       flag_values=fv)
    flags.DEFINE_enum("lr_schedule", d.lr_schedule, ["cosine", "constant"],
                      "Learning rate over the run: cosine decay to 0, or constant.",
                      flag_values=fv)
    flags.DEFINE_float("clipnorm", d.clipnorm,
                       "Clip the global gradient norm to this (0: no clipping).",
                       flag_values=fv)
    flags.DEFINE_string("source", d.source,
                        "Corpus: auto, kjv, file, or tfds:NAME (see examples/text_data.py).",
                        flag_values=fv)
    flags.DEFINE_string("data_dir", d.data_dir,
                        "kjv: directory of bible.data; file: the text file; tfds: the TFDS "
                        "data directory.", flag_values=fv)
    flags.DEFINE_integer("max_chars", d.max_chars,
                         "Use only the first N characters of the corpus (0: all).",
                         flag_values=fv)
    flags.DEFINE_enum("eval_split", d.eval_split, ["valid", "test"],
                      "Held-out split for bits per character.", flag_values=fv)
    flags.DEFINE_integer("eval_chars", d.eval_chars,
                         "Evaluate on the first N characters of the split (0: all).",
                         flag_values=fv)
    flags.DEFINE_integer("verbose", d.verbose, "Keras fit verbosity (0, 1 or 2).",
                         flag_values=fv)
    common.declare_main_key_flags(fv)  # --help lists the shared flags too


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def char_gru(vocab_size: int, width: float = 1.0, units: int = 128,
             embedding_dim: int = 32, seq_len: int | None = None) -> keras.Model:
    """Embedding -> GRU -> Dense logits over the characters (softmax in the loss).

    Args:
      vocab_size: number of characters.
      width: multiplier of the GRU units (Small-Dense uses < 1); the
        embedding and the vocabulary are fixed.
      units: GRU units at width 1.
      embedding_dim: embedding size.
      seq_len: fixed number of time steps, or None for any length
        (`rigl_keras.flops` needs a fixed one to count FLOPs).

    Returns:
      A built functional model mapping int ids (batch, time) to logits
      (batch, time, vocab_size). Layers: "embedding", "gru", "logits".
    """
    inputs = keras.Input((seq_len,), dtype="int32", name="chars")
    x = keras.layers.Embedding(vocab_size, embedding_dim, name="embedding")(inputs)
    x = keras.layers.GRU(max(1, round(units * width)), return_sequences=True, name="gru")(x)
    outputs = keras.layers.Dense(vocab_size, name="logits")(x)
    return keras.Model(inputs, outputs, name="char_gru")


def sparsifiable_counts(model) -> dict[str, tuple[int, int]]:
    """{weight name: (active, total)} of the GRU kernels and the output kernel.

    Every maskable weight but the embedding (which sparse training keeps
    dense); masked weights count their mask, plain ones (dense, small_dense)
    every entry.
    """
    import rigl_keras as rk
    from rigl_keras import layers as masked_layers

    masks = {w.name: w.mask for w in rk.masked_weights(model)}
    counts = {}
    for w in masked_layers.maskable_weights(model):
        if isinstance(w.layer, keras.layers.Embedding):
            continue
        mask = masks.get(w.name)
        active = w.size if mask is None else int(
            np.count_nonzero(keras.ops.convert_to_numpy(mask)))
        counts[w.name] = (active, w.size)
    return counts


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def load_data(config: Config):
    """(train_ids, valid_ids, test_ids, vocab) of the configured corpus."""
    return text_data.load_char_corpus(config.source, config.data_dir, config.max_chars or None)


def train_dataset(ids: np.ndarray, seq_len: int, batch_size: int, seed: int):
    """An endless tf.data pipeline of (x, y) batches of random windows of `ids`.

    Window starts are drawn uniformly from [0, len(ids) − seq_len − 1); y is
    x shifted by one character. The order is fixed by `seed`.
    """
    import tensorflow as tf

    n_starts = len(ids) - seq_len - 1
    if n_starts < 1:
        raise ValueError(
            f"The training text ({len(ids)} characters) is shorter than seq_len + 2 = "
            f"{seq_len + 2}."
        )
    ids_t = tf.constant(np.asarray(ids, dtype=np.int32))

    def window(start):
        chunk = ids_t[start:start + seq_len + 1]
        return chunk[:-1], chunk[1:]

    return (
        tf.data.Dataset.random(seed=seed)
        .map(lambda r: tf.math.floormod(r, n_starts))
        .map(window, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def eval_windows(ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive non-overlapping (x, y) windows covering `ids` (tail dropped).

    Every character but the first of each window's span is predicted once.
    """
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"Held-out text of {len(ids)} characters is shorter than seq_len + 1.")
    x = np.asarray(ids[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
    y = np.asarray(ids[1: n * seq_len + 1], dtype=np.int32).reshape(n, seq_len)
    return x, y


def bits_per_character(model, ids: np.ndarray, seq_len: int, batch_size: int = 256) -> float:
    """Mean cross-entropy of the next character over `ids`, in bits (nats / ln 2).

    Runs `model.predict` (compiled) over the `eval_windows` of `ids`.
    """
    x, y = eval_windows(ids, seq_len)
    total_nats = 0.0
    chunk = 8 * batch_size  # bounds the logits held at once
    for i in range(0, len(x), chunk):
        logits = model.predict(x[i:i + chunk], batch_size=batch_size, verbose=0)
        logits = np.asarray(logits, dtype=np.float64)
        top = logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
        target = np.take_along_axis(logits, y[i:i + chunk][..., None], axis=-1)[..., 0]
        total_nats += float(np.sum(log_z - target))
    return total_nats / y.size / math.log(2.0)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def _fraction_step(fraction: float, total: int, name: str) -> int:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"`{name}` must be a fraction of the run in [0, 1]; got {fraction}.")
    return int(round(fraction * total))


def build_method(config: Config, vocab_size: int):
    """The uncompiled model and callbacks of `config.method`.

    RigL, SNFS and SNIP grow by the gradients captured from the training
    batches themselves (no extra data).

    Args:
      config: the run's `Config`.
      vocab_size: characters in the vocabulary.

    Returns:
      (model, callbacks, build_fn): build_fn(width) builds the dense model.
    """
    from rigl_keras import baselines

    if config.method not in METHODS:
        raise ValueError(f"Unknown method {config.method!r}; choose one of {METHODS}.")

    def build_fn(width: float) -> keras.Model:
        return char_gru(vocab_size, width, config.units, config.embedding_dim, config.seq_len)

    steps = int(config.steps)
    prune_begin = _fraction_step(config.prune_begin_step, steps, "prune_begin_step")
    kwargs = dict(
        distribution=config.distribution,
        seed=config.seed,
        delta_t=config.delta_t,
        alpha=config.alpha,
        end_step=max(1, _fraction_step(config.end_step, steps, "end_step")),
        decay=config.decay,
        prune_begin_step=prune_begin,
        prune_end_step=max(prune_begin + 1,
                           _fraction_step(config.prune_end_step, steps, "prune_end_step")),
        prune_frequency=config.prune_frequency,
    )
    model, callbacks = baselines.get(config.method).build(build_fn, config.sparsity, **kwargs)
    return model, list(callbacks), build_fn


def make_optimizer(config: Config) -> keras.optimizers.Optimizer:
    """Adam with the configured peak rate, schedule and global-norm clipping."""
    lr = config.learning_rate
    if config.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, int(config.steps)))
    elif config.lr_schedule != "constant":
        raise ValueError(f"Unknown lr_schedule {config.lr_schedule!r}.")
    return keras.optimizers.Adam(lr, global_clipnorm=config.clipnorm or None)


def _pruning_schedule(config: Config):
    from rigl_keras import schedules

    steps = int(config.steps)
    begin = _fraction_step(config.prune_begin_step, steps, "prune_begin_step")
    end = max(begin + 1, _fraction_step(config.prune_end_step, steps, "prune_end_step"))
    return schedules.PolynomialSchedule(final_sparsity=0.5, begin_step=begin, end_step=end,
                                        frequency=max(1, int(config.prune_frequency)))


def _flops_ratios(config: Config, model, dense_model) -> dict:
    """Inference and training FLOPs relative to the dense model (`rigl_keras.flops`).

    Per window of `seq_len` characters: 2 FLOPs per active weight of the GRU
    kernel, the recurrent kernel and the output layer at every time step; the
    embedding lookup costs nothing (biases and elementwise gate work are not
    counted). Divided by seq_len this is FLOPs per character.
    """
    from rigl_keras import flops

    f_dense = flops.inference_flops(dense_model).dense_flops
    report = flops.inference_flops(model)
    if config.method == "dense":
        f_model = f_dense
    elif config.method == "small_dense":
        f_model = report.dense_flops  # the narrow model, all of it
    else:
        f_model = report.flops
    prune_args = {}
    if config.method == "prune":
        prune_args = dict(pruning_schedule=_pruning_schedule(config),
                          total_steps=int(config.steps))
    training = flops.training_flops_ratio(config.method, f_model, f_dense,
                                          delta_t=int(config.delta_t), **prune_args)
    return {
        "inference_flops_ratio": float(f_model / f_dense),
        "training_flops_ratio": float(training),
        "inference_flops_per_char": float(f_model / config.seq_len),
        "dense_inference_flops_per_char": float(f_dense / config.seq_len),
    }


def run(config: Config | None = None, data=None, **overrides) -> dict:
    """Trains and evaluates the character LM for one configuration.

    Args:
      config: a `Config`; None uses the defaults.
      data: preloaded (train_ids, valid_ids, test_ids, vocab), or None to
        load `config.source`.
      **overrides: `Config` fields to change, e.g. method="set", steps=20.

    Returns:
      The results dict (also written to config.output_dir/results.json).
    """
    config = dataclasses.replace(config or Config(), **overrides)
    return train_and_evaluate(config, data)[0]


def train_and_evaluate(config: Config, data=None, built=None):
    """`run`, also returning the trained model.

    Args:
      config: the run's `Config`.
      data: as in `run`.
      built: (model, callbacks, build_fn) from `build_method` to train
        instead of building them here (tests inspect the masks before).

    Returns:
      (results, model).
    """
    if config.steps < 1:
        raise ValueError(f"`steps` must be >= 1; got {config.steps}.")
    timer = common.Timer()
    common.set_seed(config.seed)
    train_ids, valid_ids, test_ids, vocab = data if data is not None else load_data(config)
    held_out = valid_ids if config.eval_split == "valid" else test_ids
    if config.eval_chars:
        held_out = held_out[: int(config.eval_chars)]

    model, callbacks, build_fn = built or build_method(config, len(vocab))
    dense_model = build_fn(1.0)  # FLOPs and parameter reference
    model.compile(
        optimizer=make_optimizer(config),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(
        train_dataset(train_ids, config.seq_len, config.batch_size, config.seed),
        epochs=1,
        steps_per_epoch=int(config.steps),
        callbacks=callbacks,
        shuffle=False,  # the dataset draws random windows itself
        verbose=config.verbose,
    )
    bpc = bits_per_character(model, held_out, config.seq_len)

    counts = sparsifiable_counts(model)
    active = sum(a for a, _ in counts.values())
    dense_total = sum(t for _, t in sparsifiable_counts(dense_model).values())
    logs = history.history
    results = {
        "script": "char_lm",
        "method": config.method,
        "sparsity": 0.0 if config.method == "dense" else float(config.sparsity),
        "distribution": config.distribution,
        "seed": config.seed,
        "steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "units": config.units,
        "gru_units": int(model.get_layer("gru").units),  # < units for small_dense
        "embedding_dim": config.embedding_dim,
        "seq_len": config.seq_len,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "delta_t": config.delta_t,
        "alpha": config.alpha,
        "vocab_size": len(vocab),
        "train_chars": int(len(train_ids)),
        "eval_split": config.eval_split,
        "eval_chars": int(eval_windows(held_out, config.seq_len)[1].size),
        # The mean training loss over the run (one Keras epoch), in bits per character.
        "train_bits_per_character": (float(logs["loss"][-1]) / math.log(2.0)
                                     if logs.get("loss") else None),
        "bits_per_character": float(bpc),
        "measured_sparsity": 1.0 - active / dense_total,
        "active_params": int(active),
        "dense_params": int(dense_total),
        "weight_sparsity": {name: 1.0 - a / t for name, (a, t) in counts.items()},
        **_flops_ratios(config, model, dense_model),
        "source": config.source,
        "wall_time_s": timer(),
    }
    if config.output_dir:
        common.write_results(config.output_dir, results)
    return results, model


def format_results(results: dict) -> str:
    """A short human-readable summary."""
    return "\n".join([
        f"method               {results['method']}",
        f"sparsity (target)    {results['sparsity']:g} ({results['distribution']})",
        f"measured sparsity    {results['measured_sparsity']:.4f} "
        f"({results['active_params']} / {results['dense_params']} weights active)",
        f"bits per character   {results['bits_per_character']:.4f} ({results['eval_split']}, "
        f"{results['eval_chars']} chars)",
        f"inference FLOPs      {results['inference_flops_ratio']:.3f}x dense",
        f"training FLOPs       {results['training_flops_ratio']:.3f}x dense",
        f"steps                {results['steps']}",
        f"wall time            {results['wall_time_s']:.1f} s",
    ])


def main(argv) -> None:
    """The program: runs the configuration the flags describe and prints a summary.

    Returns None (absl's `app.run` exits with main's return value).
    """
    del argv  # unused
    from absl import flags

    config = common.config_from_flags(Config, flags.FLAGS)
    results = run(config)
    print(format_results(results))
    if config.output_dir:
        print(f"results written to {config.output_dir}/results.json")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
