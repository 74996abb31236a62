"""The character language model example (examples/char_lm.py) and its data module.

Training runs use a 20,000-character slice of the King James Bible from
Debian's `bible-kjv` package (`make text-data` installs it; the tests skip
without it), a 32-unit GRU and 20 steps, in-process.
"""

import dataclasses
import json
import math
import os
import sys

import keras
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from examples import char_lm  # noqa: E402
from examples import reproduce  # noqa: E402
from examples import text_data  # noqa: E402

SLICE_CHARS = 20000

needs_kjv = pytest.mark.skipif(
    not text_data.kjv_available(),
    reason=f"Debian package {text_data.KJV_DEBIAN_PACKAGE!r} not installed (make text-data)",
)

RESULT_KEYS = {
    "method", "sparsity", "bits_per_character", "measured_sparsity",
    "inference_flops_ratio", "training_flops_ratio",
}


@pytest.fixture(scope="module")
def corpus_slice(tmp_path_factory):
    if not text_data.kjv_available():
        pytest.skip(f"Debian package {text_data.KJV_DEBIAN_PACKAGE!r} not installed")
    path = tmp_path_factory.mktemp("text") / "kjv_slice.txt"
    return text_data.make_text_slice(SLICE_CHARS, path)


def small_config(**overrides):
    values = dict(steps=20, units=32, embedding_dim=16, seq_len=32, batch_size=16,
                  sparsity=0.8, delta_t=5, end_step=1.0, source="file")
    values.update(overrides)
    return char_lm.Config(**values)


# --- flags ------------------------------------------------------------------


def test_flags_shared_with_the_fashion_mnist_scripts_map_to_the_config():
    from absl import flags

    from examples import common

    flag_values = flags.FlagValues()  # empty, hence falsy: must still be used
    char_lm.define_flags(flag_values)
    flag_values(["prog", "--method=set", "--sparsity=0.9", "--end_step=0.5",
                 "--prune_begin_step=0.1", "--prune_frequency=7", "--steps=30"])
    config = common.config_from_flags(char_lm.Config, flag_values)
    assert (config.method, config.sparsity, config.end_step, config.prune_begin_step,
            config.prune_frequency, config.steps) == ("set", 0.9, 0.5, 0.1, 7, 30)
    assert config.delta_t == 100 and config.distribution == "erk"
    assert "multiplier" not in flag_values  # steps, not epochs: no training multiplier
    # The shared flags are defined once, in examples/common.py.
    shared = {f.name for f in flag_values.flags_by_module_dict()["examples.common"]}
    assert {"method", "sparsity", "delta_t", "alpha", "decay", "end_step", "prune_begin_step",
            "prune_end_step", "prune_frequency", "seed", "output_dir"} <= shared


def test_help_lists_the_shared_flags():
    import subprocess

    done = subprocess.run(
        [sys.executable, os.path.join("examples", "char_lm.py"), "--help"], cwd=REPO,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True,
        timeout=120,
    )
    assert done.returncode in (0, 1), done.stderr[-2000:]  # absl's --help exits 1
    for flag in ("--method", "--end_step", "--prune_frequency", "--steps", "--units"):
        assert f"  {flag}:" in done.stdout, (flag, done.stdout[-1500:])


# --- data -------------------------------------------------------------------


def test_split_is_deterministic_90_5_5(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    train, valid, test, vocab = text_data.load_char_corpus("file", str(path))
    assert (len(train), len(valid), len(test)) == (900, 50, 50)
    assert all(a.dtype == np.int32 for a in (train, valid, test))
    assert vocab == sorted(set(text))
    assert text_data.decode(np.concatenate([train, valid, test]), vocab) == text
    again = text_data.load_char_corpus("file", str(path))
    assert all(np.array_equal(a, b) for a, b in zip((train, valid, test), again[:3]))


def test_missing_sources_explain_themselves(tmp_path):
    with pytest.raises(text_data.DatasetNotFoundError, match="text file"):
        text_data.load_char_corpus("file", str(tmp_path / "absent.txt"))
    with pytest.raises(ValueError, match="not in the TensorFlow Datasets catalog"):
        text_data.load_char_corpus("wikitext103")
    with pytest.raises(ValueError, match="Unknown source"):
        text_data.load_char_corpus("nope")
    if not text_data.kjv_available():
        with pytest.raises(text_data.DatasetNotFoundError, match="apt-get install"):
            text_data.load_char_corpus()


@needs_kjv
def test_kjv_slice_is_english_prose(corpus_slice):
    train, valid, test, vocab = text_data.load_char_corpus("file", corpus_slice)
    assert len(train) + len(valid) + len(test) == SLICE_CHARS
    text = text_data.decode(train[:60], vocab)
    assert text.startswith("In the beginning God created the heaven and the earth.")
    full = text_data.load_char_corpus(max_chars=SLICE_CHARS)  # the same text, by "auto"
    assert np.array_equal(full[0], train) and full[3] == vocab


# --- training ---------------------------------------------------------------


@needs_kjv
def test_rigl_run_changes_masks_and_keeps_counts(corpus_slice, tmp_path):
    import rigl_keras as rk

    config = small_config(method="rigl", data_dir=corpus_slice, output_dir=str(tmp_path))
    data = char_lm.load_data(config)
    built = char_lm.build_method(config, len(data[3]))
    before = {w.name: keras.ops.convert_to_numpy(w.mask).copy()
              for w in rk.masked_weights(built[0])}
    assert set(before) == {"gru/gru_cell/kernel", "gru/gru_cell/recurrent_kernel", "logits"}

    results, model = char_lm.train_and_evaluate(config, data, built=built)

    after = {w.name: keras.ops.convert_to_numpy(w.mask) for w in rk.masked_weights(model)}
    recurrent = "gru/gru_cell/recurrent_kernel"
    assert np.any(before[recurrent] != after[recurrent]), "RigL never changed the mask"
    for name in before:
        assert np.count_nonzero(after[name]) == np.count_nonzero(before[name]), name
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(results))
    check_results(saved, "rigl", 0.8)


@needs_kjv
@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="one backend is enough for the static path (the RigL test runs on all)")
def test_static_run_writes_results(corpus_slice, tmp_path):
    results = char_lm.run(small_config(method="static", data_dir=corpus_slice,
                                       output_dir=str(tmp_path)))
    check_results(results, "static", 0.8)
    assert results["training_flops_ratio"] == pytest.approx(results["inference_flops_ratio"])


def check_results(results, method, sparsity):
    assert RESULT_KEYS <= set(results)
    assert results["method"] == method and results["sparsity"] == sparsity
    assert math.isfinite(results["bits_per_character"]) and results["bits_per_character"] > 0
    assert results["measured_sparsity"] == pytest.approx(sparsity, abs=0.01)
    # FLOPs per character: 2 per active weight of the masked matrices.
    assert results["inference_flops_per_char"] == 2 * results["active_params"]
    assert results["inference_flops_ratio"] == pytest.approx(1 - results["measured_sparsity"])
    assert 0 < results["training_flops_ratio"] < 1


# --- the sweep (examples/reproduce_char_lm.py) -------------------------------


@needs_kjv
@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="the sweep's loop is backend-independent; char_lm runs on all")
def test_sweep_trains_tabulates_plots_and_resumes(corpus_slice, tmp_path):
    import csv

    from examples import reproduce_char_lm

    config = reproduce_char_lm.CharSweepConfig(
        methods=("dense", "rigl", "prune"), sparsities=(0.8,), seeds=1, steps=12, units=16,
        embedding_dim=8, seq_len=16, batch_size=8, delta_t=4, source="file",
        data_dir=corpus_slice, eval_chars=2000, output_dir=str(tmp_path))
    lines = []
    first = reproduce_char_lm.sweep(config, log=lines.append)
    assert first["new_runs"] == 3
    for name in ("results.csv", "results.md", "bpc_vs_training_flops.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"dense", "rigl", "prune"}
    for method in ("rigl", "prune"):
        check_results({k: char_lm_value(v) for k, v in rows[method].items()}, method, 0.8)
    table = (tmp_path / "results.md").read_text()
    bpc = float(rows["rigl"]["bits_per_character"])
    assert f"| RigL | {bpc:.3f} |" in table and "S=0.8 BPC" in table
    assert "held-out characters" in table

    def must_not_run(run_config):
        raise AssertionError(f"run {run_config.method} was redone")

    again = reproduce_char_lm.sweep(config, run_fn=must_not_run, log=lambda line: None)
    assert again["new_runs"] == 0
    # A changed run setting is a different run.
    changed = reproduce_char_lm.run_id(
        reproduce_char_lm.CharSweepConfig(steps=13), reproduce.RunSpec("rigl", 0.8, 0))
    assert changed != reproduce_char_lm.run_id(
        reproduce_char_lm.CharSweepConfig(steps=12), reproduce.RunSpec("rigl", 0.8, 0))


def char_lm_value(text):
    try:
        return float(text) if "." in text or "e" in text else int(text)
    except ValueError:
        return text


def test_sweep_seed_ranges_share_one_directory(tmp_path):
    """Two sweeps over disjoint seeds (one per core) end in one table."""
    from examples import reproduce_char_lm

    def fake(run_config):
        return {"method": run_config.method, "sparsity": run_config.sparsity,
                "seed": run_config.seed, "bits_per_character": 2.0 + run_config.seed,
                "training_flops_ratio": 0.3, "inference_flops_ratio": 0.25,
                "measured_sparsity": run_config.sparsity, "wall_time_s": 0.0}

    base = reproduce_char_lm.CharSweepConfig(methods=("static",), sparsities=(0.75,),
                                             seeds=1, output_dir=str(tmp_path))
    first = dataclasses.replace(base, seeds_from=0)
    second = dataclasses.replace(base, seeds_from=1)
    assert [s.seed for s in reproduce_char_lm.plan(second)] == [1]
    reproduce_char_lm.sweep(first, run_fn=fake, log=lambda line: None)
    reproduce_char_lm.sweep(second, run_fn=fake, log=lambda line: None)
    with open(tmp_path / "results.csv") as f:
        assert len(f.read().strip().splitlines()) == 3  # header + both seeds

    def must_not_run(run_config):
        raise AssertionError("summarize_only trained a run")

    both = dataclasses.replace(base, seeds=2, summarize_only=True)
    summary = reproduce_char_lm.sweep(both, run_fn=must_not_run, log=lambda line: None)
    assert len(summary["rows"]) == 2
    assert "| Static | 2.500 ± 0.707 |" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="seeds_from"):
        reproduce_char_lm.plan(dataclasses.replace(base, seeds_from=-1))


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="flag parsing is backend-independent")
def test_sweep_help_lists_its_flags():
    import subprocess

    done = subprocess.run(
        [sys.executable, os.path.join("examples", "reproduce_char_lm.py"), "--help"],
        cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True,
        text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr[-2000:]  # absl's --help exits 1
    for flag in ("--methods", "--sparsities", "--seeds", "--seeds_from", "--steps",
                 "--[no]summarize_only", "--output_dir"):
        assert f"  {flag}:" in done.stdout, (flag, done.stdout[-1500:])
