"""The character language model example (examples/char_lm.py) and its data module.

Training runs use a 20,000-character slice of the King James Bible from
Debian's `bible-kjv` package (`make text-data` installs it; the tests skip
without it), a 32-unit GRU and 20 steps, in-process.
"""

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
