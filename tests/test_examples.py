"""End-to-end tests of the example scripts on tiny data.

Fashion-MNIST runs use tiny idx files written here (so the tests do not depend
on the Debian package); CIFAR-10 and ImageNet use `tfds.testing.mock_data`.
Scripts run in-process through their `run` functions (a subprocess costs
seconds to start); one test runs a script as a program. Runs on every Keras
backend (KERAS_BACKEND); the TFDS mock-data tests need TensorFlow's backend.
"""

import csv
import dataclasses
import gzip
import json
import os
import struct
import subprocess
import sys

import keras
import numpy as np
import pytest
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from examples import cifar10_wrn  # noqa: E402
from examples import common  # noqa: E402
from examples import data as data_lib  # noqa: E402
from examples import fashion_mnist  # noqa: E402
from examples import fashion_mnist_cnn  # noqa: E402
from examples import fashion_mnist_mlp  # noqa: E402
from examples import imagenet_resnet50  # noqa: E402
from examples import reproduce  # noqa: E402

REQUIRED_KEYS = {
    "method", "sparsity", "test_accuracy", "measured_sparsity",
    "inference_flops_ratio", "training_flops_ratio", "seed", "distribution",
    "multiplier", "epochs", "wall_time_s",
}

#: TFDS pipelines are tf.data graphs: their mock-data tests run on TensorFlow only.
tensorflow_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tfds mock data / tf.data pipelines need the TensorFlow backend",
)

_IDX_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def write_idx(path, array):
    """Writes `array` as an idx file (gzipped if `path` ends in .gz)."""
    array = np.asarray(array)
    code = _IDX_CODES[array.dtype.str[1:]]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + payload)


def write_fashion_mnist(directory, n_train=200, n_test=100, seed=0):
    """Tiny learnable Fashion-MNIST look-alike: a bright band whose row is the class."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype("u1")
        images = rng.integers(0, 60, (n, 28, 28)).astype("u1")
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label: 4 + 2 * label, 4:24] = 255
        write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte.gz"), labels)
    return str(directory)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return write_fashion_mnist(tmp_path_factory.mktemp("fashion_mnist"))


def tiny_mnist(**overrides):
    """A `fashion_mnist.Config` that runs in a couple of seconds."""
    base = dict(epochs=1, batch_size=50, delta_t=2, prune_frequency=1,
                learning_rate=0.05, verbose=0)
    base.update(overrides)
    return fashion_mnist.Config(**base)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("suffix", [".gz", ""])
def test_read_idx_round_trip(tmp_path, dtype, suffix):
    array = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(np.dtype(dtype).newbyteorder("="))
    if dtype == "u1":
        array = np.arange(24, dtype="u1").reshape(2, 3, 4)
    path = tmp_path / f"x-idx3{suffix}"
    write_idx(path, array)
    result = data_lib.read_idx(path)
    assert result.shape == (2, 3, 4)
    assert result.dtype == array.dtype
    np.testing.assert_array_equal(result, array)


def test_read_idx_one_dimensional_labels(tmp_path):
    labels = np.array([9, 0, 3], dtype="u1")
    write_idx(tmp_path / "labels.gz", labels)
    np.testing.assert_array_equal(data_lib.read_idx(tmp_path / "labels.gz"), labels)


def test_read_idx_rejects_malformed_files(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="magic"):
        data_lib.read_idx(bad_magic)
    truncated = tmp_path / "short"
    write_idx(truncated, np.zeros((4, 4), "u1"))
    truncated.write_bytes(truncated.read_bytes()[:-3])
    with pytest.raises(ValueError, match="shape"):
        data_lib.read_idx(truncated)
    bad_code = tmp_path / "code"
    bad_code.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="type code"):
        data_lib.read_idx(bad_code)


def test_load_fashion_mnist_from_data_dir(idx_dir):
    data = data_lib.load_fashion_mnist(idx_dir, train_limit=150)
    assert data.x_train.shape == (150, 28, 28) and data.y_train.shape == (150,)
    assert data.x_test.shape == (100, 28, 28)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    assert 0.0 <= data.x_train.min() and data.x_train.max() == 1.0
    assert data.source == f"idx:{idx_dir}"
    (x, y), (x_test, y_test) = data_lib.load_fashion_mnist(idx_dir, flatten=True)
    assert x.shape == (200, 784) and x_test.shape == (100, 784) and y.shape == (200,)


def test_offline_fallback_to_idx_files(idx_dir, tmp_path):
    # A TFDS directory with an unprepared fashion_mnist folder: fall back to
    # the Debian location (here: the tiny idx files), without any download.
    (tmp_path / "tfds" / "fashion_mnist").mkdir(parents=True)
    data = data_lib.load_fashion_mnist(
        tfds_data_dir=str(tmp_path / "tfds"), debian_dir=idx_dir)
    assert data.source == f"idx:{idx_dir}"
    assert len(data.x_train) == 200


def test_missing_dataset_gives_one_clear_error(tmp_path):
    with pytest.raises(data_lib.DatasetNotFoundError) as error:
        data_lib.load_fashion_mnist(
            tfds_data_dir=str(tmp_path / "tfds"), debian_dir=str(tmp_path / "none"))
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data_dir" in message
    # A --data_dir without the files names what is missing, and both ways.
    (tmp_path / "partial").mkdir()
    with pytest.raises(data_lib.DatasetNotFoundError) as error:
        data_lib.load_fashion_mnist(str(tmp_path / "partial"))
    assert "train-images-idx3-ubyte" in str(error.value)
    assert "apt-get install dataset-fashion-mnist" in str(error.value)


@tensorflow_only
def test_tfds_pipelines_with_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        train, test = data_lib.cifar10_datasets(4, image_size=16)
        x, y = next(iter(train))
        assert x.shape == (4, 16, 16, 3) and y.shape == (4,)
        train, test = data_lib.imagenet_datasets(2, image_size=24, test_limit=3)
        x, y = next(iter(train))
        assert x.shape == (2, 24, 24, 3) and y.shape == (2, 1000)
        assert sum(int(b[0].shape[0]) for b in test) == 3


# ---------------------------------------------------------------------------
# Fashion-MNIST scripts
# ---------------------------------------------------------------------------


def test_mlp_every_method_end_to_end(idx_dir, tmp_path):
    data = data_lib.load_fashion_mnist(idx_dir)
    for method in ("dense", "static", "snip", "set", "snfs", "rigl", "prune", "small_dense"):
        out = tmp_path / method
        results = fashion_mnist_mlp.run(
            tiny_mnist(method=method, sparsity=0.9, output_dir=str(out)), data=data)
        saved = json.loads((out / "results.json").read_text())
        assert REQUIRED_KEYS <= set(saved), method
        assert saved["method"] == method
        assert saved["steps"] == 4  # 200 rows / batch 50, one epoch
        assert 0.0 <= saved["test_accuracy"] <= 1.0
        if method == "dense":
            assert saved["measured_sparsity"] == 0.0
            assert saved["inference_flops_ratio"] == saved["training_flops_ratio"] == 1.0
        elif method == "small_dense":
            assert saved["measured_sparsity"] == pytest.approx(0.9, abs=0.01)
            assert saved["inference_flops_ratio"] == pytest.approx(0.1, abs=0.01)
        else:
            # LeNet-300-100's Dense layers all have one output position, so
            # inference FLOPs are exactly the density.
            assert saved["measured_sparsity"] == pytest.approx(0.9, abs=1e-4), method
            assert saved["inference_flops_ratio"] == pytest.approx(0.1, abs=1e-4)
        if method == "rigl":
            assert saved["mask_updates"] >= 1
            assert saved["training_flops_ratio"] > saved["inference_flops_ratio"]
            assert (out / "connectivity.npz").exists()
        if method == "snfs":  # 2 f_S + f_D per step
            assert saved["training_flops_ratio"] == pytest.approx((2 * 0.1 + 1) / 3, abs=1e-3)
        if method == "prune":  # dense at first, so between sparse and dense cost
            assert 0.1 < saved["training_flops_ratio"] < 1.0
        assert results["test_accuracy"] == saved["test_accuracy"]


def test_multiplier_scales_steps_and_training_flops(idx_dir):
    data = data_lib.load_fashion_mnist(idx_dir)
    results = fashion_mnist_mlp.run(tiny_mnist(method="static", multiplier=1.5), data=data)
    assert results["steps"] == 6  # 1 epoch × 1.5 × 4 steps
    assert results["training_flops_ratio"] == pytest.approx(1.5 * 0.1, abs=1e-4)


def test_cnn_end_to_end(idx_dir, tmp_path):
    results = fashion_mnist_cnn.run(
        tiny_mnist(method="rigl", output_dir=str(tmp_path)), data_lib.load_fashion_mnist(idx_dir))
    assert results["model"] == "cnn" and results["script"] == "fashion_mnist_cnn"
    assert results["measured_sparsity"] == pytest.approx(0.9, abs=1e-3)
    # Convolutions reuse weights at many positions: ERK keeps them denser.
    assert results["inference_flops_ratio"] > 0.1
    assert REQUIRED_KEYS <= set(json.loads((tmp_path / "results.json").read_text()))


def test_mlp_script_runs_as_a_program(idx_dir, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, os.path.join("examples", "fashion_mnist_mlp.py"), "--method=set",
        "--sparsity=0.8", f"--data_dir={idx_dir}", "--epochs=1", "--batch_size=100",
        "--delta_t=1", f"--output_dir={out}", "--seed=3",
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test accuracy" in done.stdout and "training FLOPs" in done.stdout
    saved = json.loads((out / "results.json").read_text())
    assert saved["method"] == "set" and saved["seed"] == 3 and saved["sparsity"] == 0.8


@pytest.mark.parametrize("script", ["fashion_mnist_mlp.py", "fashion_mnist_cnn.py"])
def test_help_lists_the_flags(script):
    # Regression: the flags are defined in examples.common/fashion_mnist, so
    # absl's --help (key flags of the main module) printed none of them.
    done = subprocess.run(
        [sys.executable, os.path.join("examples", script), "--help"], cwd=REPO,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True,
        timeout=120,
    )
    assert done.returncode in (0, 1), done.stderr[-2000:]  # absl's --help exits 1
    for flag in ("--method", "--sparsity", "--delta_t", "--epochs", "--data_dir"):
        assert f"  {flag}:" in done.stdout, (flag, done.stdout[-1500:])


def test_flags_of_every_script_map_to_configs():
    cases = [
        (fashion_mnist_mlp, fashion_mnist.Config, ["--method=snfs", "--multiplier=2"],
         dict(method="snfs", multiplier=2.0, batch_size=100, learning_rate=0.1,
              weight_decay=1e-4, delta_t=100, alpha=0.3)),
        (fashion_mnist_cnn, fashion_mnist.Config, ["--train_limit=7"], dict(train_limit=7)),
        (cifar10_wrn, cifar10_wrn.Config, ["--lr_drop_steps=1,2"],
         dict(batch_size=128, learning_rate=0.1, weight_decay=5e-4, train_steps=97656,
              end_step=75000, lr_drop_steps=["1", "2"])),
        (imagenet_resnet50, imagenet_resnet50.Config, ["--strategy=mirrored"],
         dict(batch_size=4096, learning_rate=1.6, label_smoothing=0.1, weight_decay=1e-4,
              strategy="mirrored", distribution="uniform")),
    ]
    for module, config_class, argv, expected in cases:
        flag_values = flags.FlagValues()
        module.define_flags(flag_values)
        flag_values(["prog"] + argv)
        config = common.config_from_flags(config_class, flag_values)
        for key, value in expected.items():
            assert getattr(config, key) == value, (module.__name__, key)
    sweep_flags = flags.FlagValues()
    reproduce.define_flags(sweep_flags)
    sweep_flags(["prog", "--methods=rigl,set", "--sparsities=0.5,0.7"])
    config = reproduce.config_from_flags(sweep_flags)
    assert config.methods == ("rigl", "set") and config.sparsities == (0.5, 0.7)
    quick_flags = flags.FlagValues()
    reproduce.define_flags(quick_flags)
    quick_flags(["prog", "--quick", "--seeds=1"])
    quick = reproduce.config_from_flags(quick_flags)
    assert quick.methods == ("dense", "static", "set", "rigl") and quick.epochs == 5
    assert quick.sparsities == (0.9, 0.98) and quick.plot_connectivity
    assert quick.seeds == 1  # given explicitly: wins over the preset
    default = reproduce.SweepConfig()
    assert len(default.methods) == 8 and default.sparsities == (0.8, 0.9, 0.95, 0.98)
    assert default.seeds == 3


# ---------------------------------------------------------------------------
# The official MNIST regime (--preset=official_mnist) and Small-Dense rules
# ---------------------------------------------------------------------------


def parse_mlp_flags(*argv):
    flag_values = flags.FlagValues()
    fashion_mnist_mlp.define_flags(flag_values)
    flag_values(["prog", *argv])
    return fashion_mnist.config_from_flags(flag_values)


def test_official_mnist_preset_sets_the_official_regime():
    # rigl/mnist/mnist_train_eval.py's flag defaults.
    config = parse_mlp_flags("--preset=official_mnist", "--method=rigl", "--sparsity=0.98")
    expected = dict(
        preset="official_mnist", epochs=200.0, batch_size=100, learning_rate=0.2,
        momentum=0.9, weight_decay=1e-4, lr_schedule="piecewise", lr_drop_factor=3.0,
        lr_drop_epochs=(75.0, 95.0), delta_t=100, alpha=0.3, decay="cosine", end_step=50000,
        prune_begin_step=2000, prune_end_step=30000, prune_frequency=500,
        sparsity_scales=(("fc1", 1.0), ("fc2", 0.9)), dense_layers=("logits",),
        steps_per_execution=100, method="rigl", sparsity=0.98,
    )
    for key, value in expected.items():
        assert getattr(config, key) == value, key
    assert isinstance(config.end_step, int) and isinstance(config.prune_begin_step, int)
    # The dense baseline drops at epochs 60, 70, 80 in the official code.
    assert parse_mlp_flags("--preset=official_mnist", "--method=dense").lr_drop_epochs == (
        60.0, 70.0, 80.0)
    # Flags given explicitly win over the preset; the rest keeps it.
    short = parse_mlp_flags("--preset=official_mnist", "--epochs=3", "--learning_rate=0.1",
                            "--steps_per_execution=1")
    assert (short.epochs, short.learning_rate, short.steps_per_execution) == (3.0, 0.1, 1)
    assert short.end_step == 50000 and short.lr_schedule == "piecewise"
    # Without --preset nothing changes.
    assert parse_mlp_flags().lr_schedule == "cosine" and parse_mlp_flags().preset == ""
    with pytest.raises(ValueError, match="Unknown preset"):
        fashion_mnist.apply_preset(fashion_mnist.Config(), "imagenet")
    with pytest.raises(ValueError, match="model"):
        fashion_mnist.apply_preset(fashion_mnist.Config(model="cnn"), "official_mnist")


def test_official_lr_schedule_steps_hand_computed():
    # 600 steps per epoch (60,000 / 100): drops after steps 45,000 and 57,000
    # (tf.train.piecewise_constant: the new value from boundary + 1 on).
    config = fashion_mnist.apply_preset(fashion_mnist.Config(method="set"), "official_mnist")
    assert fashion_mnist.lr_boundaries(config, 600) == [45000, 57000]
    schedule = fashion_mnist.learning_rate_schedule(config, 120000, steps_per_epoch=600)
    lr = {step: float(keras.ops.convert_to_numpy(schedule(step)))
          for step in (0, 45000, 45001, 57000, 57001, 119999)}
    assert lr[0] == lr[45000] == pytest.approx(0.2)
    assert lr[45001] == lr[57000] == pytest.approx(0.2 / 3)
    assert lr[57001] == lr[119999] == pytest.approx(0.2 / 9)
    # Epochs scale with M: 2 × 75 × 600 = 90,000.
    doubled = dataclasses.replace(config, multiplier=2.0)
    assert fashion_mnist.lr_boundaries(doubled, 600) == [90000, 114000]
    with pytest.raises(ValueError, match="lr_drop_epochs"):
        fashion_mnist.learning_rate_schedule(dataclasses.replace(config, lr_drop_epochs=()), 10,
                                             steps_per_epoch=600)
    with pytest.raises(ValueError, match="increase"):
        fashion_mnist.learning_rate_schedule(
            dataclasses.replace(config, lr_drop_epochs=(95.0, 75.0)), 10, steps_per_epoch=600)


def test_resolve_step_fractions_and_step_counts():
    resolve = fashion_mnist.resolve_step
    assert resolve(0.75, 1000, 1.0, "end_step") == 750  # fraction of the run
    assert resolve(1.0, 1000, 1.0, "end_step") == 1000
    assert resolve(50000, 1000, 1.0, "end_step") == 50000  # an int is a step count
    assert resolve(50000, 1000, 2.0, "end_step") == 100000  # scaled by M
    assert resolve(50000.0, 1000, 1.0, "end_step") == 50000  # whole float > 1, from a flag
    with pytest.raises(ValueError, match="end_step"):
        resolve(1.5, 1000, 1.0, "end_step")
    with pytest.raises(ValueError, match="prune_end_step"):
        resolve(-1, 1000, 1.0, "prune_end_step")


def test_official_mnist_preset_trains_with_its_masks_and_schedules(idx_dir, tmp_path):
    data = data_lib.load_fashion_mnist(idx_dir)
    # Tiny data: 200 images, 2 steps per epoch; a short run keeps the preset's
    # masks, lr and T_end, with ΔT and steps_per_execution shrunk to fit.
    base = fashion_mnist.Config(method="rigl", sparsity=0.9)
    short = dict(epochs=4.0, delta_t=2, steps_per_execution=2)
    config = dataclasses.replace(
        fashion_mnist.apply_preset(base, "official_mnist", keep=short), **short,
        output_dir=str(tmp_path / "rigl"))
    results = fashion_mnist_mlp.run(config, data=data)
    assert results["preset"] == "official_mnist" and results["steps"] == 8
    # fc1 at S, fc2 at 0.9·S, the output layer dense (hand-computed exact counts).
    assert results["layer_sparsity"] == {
        "fc1": pytest.approx(0.9), "fc2": pytest.approx(0.81), "logits": 0.0}
    assert results["active_params"] == (235200 - 211680) + (30000 - 24300) + 1000
    assert results["end_step"] == 50000
    # Keras' PyTorch trainer runs one step per execution.
    assert results["steps_per_execution"] == (1 if keras.backend.backend() == "torch" else 2)
    assert results["lr_drop_steps"] == [150, 190]  # epochs 75, 95 × 2 steps
    assert results["mask_updates"] == 4  # after steps 2, 4, 6, 8 (all before T_end)
    # Pruning reaches the same per-layer targets (step counts as given).
    prune = dataclasses.replace(
        fashion_mnist.apply_preset(dataclasses.replace(base, method="prune"), "official_mnist",
                                   keep=short),
        **short, prune_begin_step=2, prune_end_step=6, prune_frequency=2)
    results = fashion_mnist_mlp.run(prune, data=data)
    assert results["prune_steps"] == [2, 6, 2]
    assert results["layer_sparsity"] == {
        "fc1": pytest.approx(0.9), "fc2": pytest.approx(0.81), "logits": 0.0}
    # The preset leaves the update timing alone; --timing=official is passed through.
    assert config.timing == "keras" and results["timing"] == "keras"
    official = dataclasses.replace(config, timing="official", steps_per_execution=1,
                                   output_dir=None)
    results = fashion_mnist_mlp.run(official, data=data)
    assert results["timing"] == "official" and results["mask_updates"] >= 1


def test_small_dense_rules_in_the_example(idx_dir):
    data = data_lib.load_fashion_mnist(idx_dir)
    # The official MLP config's Small-Dense at S = 0.98: hidden sizes (8, 8),
    # 784·8 + 8·8 + 8·10 = 6,416 kernel weights, 6,442 parameters.
    assert fashion_mnist.lenet_300_100(hidden_sizes=(8, 8)).count_params() == 6442
    fixed = fashion_mnist_mlp.run(
        tiny_mnist(method="small_dense", sparsity=0.98, small_dense_rule="fixed"), data=data)
    assert fixed["active_params"] == 6416 and fixed["dense_params"] == 266200
    # The storage rule gives a wider model than the parameter rule (masks count).
    params = fashion_mnist_mlp.run(tiny_mnist(method="small_dense", sparsity=0.98), data=data)
    storage = fashion_mnist_mlp.run(
        tiny_mnist(method="small_dense", sparsity=0.98, small_dense_rule="storage"), data=data)
    assert params["active_params"] == 784 * 7 + 7 * 2 + 2 * 10  # (7, 2)
    assert storage["active_params"] == 784 * 18 + 18 * 6 + 6 * 10  # (18, 6)
    explicit = fashion_mnist_mlp.run(tiny_mnist(
        method="small_dense", small_dense_rule="fixed", small_dense_hidden=(5, 3)), data=data)
    assert explicit["active_params"] == 784 * 5 + 5 * 3 + 3 * 10
    with pytest.raises(ValueError, match="small_dense_hidden"):
        fashion_mnist_mlp.run(tiny_mnist(method="small_dense", sparsity=0.9,
                                         small_dense_rule="fixed"), data=data)
    with pytest.raises(ValueError, match="hidden_sizes"):
        fashion_mnist.lenet_300_100(hidden_sizes=(8,))
    config = parse_mlp_flags("--method=small_dense", "--small_dense_rule=fixed",
                             "--small_dense_hidden=8,8")
    assert config.small_dense_hidden == (8, 8) and config.small_dense_rule == "fixed"


def test_reproduce_preset_resolves_every_run():
    sweep_flags = flags.FlagValues()
    reproduce.define_flags(sweep_flags)
    sweep_flags(["prog", "--preset=official_mnist", "--methods=rigl,dense",
                 "--sparsities=0.98", "--epochs=2"])
    config = reproduce.config_from_flags(sweep_flags)
    assert config.preset == "official_mnist" and config.keep == ("epochs",)
    rigl = reproduce.run_config(config, reproduce.RunSpec("rigl", 0.98, 1))
    assert (rigl.epochs, rigl.learning_rate, rigl.end_step, rigl.lr_drop_epochs) == (
        2.0, 0.2, 50000, (75.0, 95.0))
    assert rigl.preset == "official_mnist" and rigl.seed == 1
    dense = reproduce.run_config(config, reproduce.RunSpec("dense", 0.0, 0))
    assert dense.lr_drop_epochs == (60.0, 70.0, 80.0)
    run_id = reproduce.run_id(config, reproduce.RunSpec("rigl", 0.98, 1))
    assert "official_mnist" in run_id and run_id != reproduce.run_id(
        dataclasses.replace(config, keep=()), reproduce.RunSpec("rigl", 0.98, 1))
    line = reproduce.settings_line(config)
    assert "official_mnist" in line and "÷3 at epochs 75, 95 (dense: 60, 70, 80)" in line
    assert "T_end = step 50000" in line and "fc2 at 0.9·S" in line
    assert "keras update timing; steps_per_execution 100" in line
    # --timing=official is passed to every run (with steps_per_execution 1) and
    # changes the run ids.
    official = dataclasses.replace(config, timing="official")
    run = reproduce.run_config(official, reproduce.RunSpec("rigl", 0.98, 1))
    assert run.timing == "official" and run.steps_per_execution == 1
    assert reproduce.run_id(official, reproduce.RunSpec("rigl", 0.98, 1)) != run_id
    # Without a preset, run ids are those of earlier sweeps (resumable).
    plain = reproduce.SweepConfig()
    assert reproduce.run_id(plain, reproduce.RunSpec("rigl", 0.9, 0)).startswith(
        "mlp-rigl-erk-s0.9-m1-e10-seed0-")
    both = flags.FlagValues()
    reproduce.define_flags(both)
    both(["prog", "--preset=official_mnist", "--quick"])
    with pytest.raises(ValueError, match="exclusive"):
        reproduce.config_from_flags(both)


# ---------------------------------------------------------------------------
# reproduce.py
# ---------------------------------------------------------------------------


def test_reproduce_writes_everything_and_resumes(idx_dir, tmp_path):
    config = reproduce.SweepConfig(
        methods=("dense", "static", "rigl"), sparsities=(0.9,), seeds=1, epochs=1,
        batch_size=50, learning_rate=0.05, delta_t=2, output_dir=str(tmp_path / "sweep"),
        data_dir=idx_dir, plot_connectivity=True,
    )
    lines = []
    first = reproduce.sweep(config, log=lines.append)
    assert first["new_runs"] == 3
    assert any("ETA" in line for line in lines)
    for name in ("results.csv", "results.md", "accuracy_vs_sparsity.png",
                 "accuracy_vs_training_flops.png", "connectivity.png"):
        assert (tmp_path / "sweep" / name).stat().st_size > 0, name
    with open(tmp_path / "sweep" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["method"] for r in rows) == ["dense", "rigl", "static"]
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert "| RigL |" in table and "| Dense |" in table and "S=0.9 acc" in table

    # Second invocation: nothing is trained again.
    def must_not_run(run_config):
        raise AssertionError(f"run {run_config.method} was redone")

    second = reproduce.sweep(config, run_fn=must_not_run, log=lambda line: None)
    assert second["new_runs"] == 0
    assert [r["test_accuracy"] for r in second["rows"]] == pytest.approx(
        [r["test_accuracy"] for r in first["rows"]])

    # Without the CSV, the per-run results.json files are enough to resume.
    os.remove(tmp_path / "sweep" / "results.csv")
    third = reproduce.sweep(config, run_fn=must_not_run, log=lambda line: None)
    assert third["new_runs"] == 0
    assert (tmp_path / "sweep" / "results.csv").exists()

    # A new sparsity only runs the new cells.
    bigger = dataclasses.replace(config, sparsities=(0.9, 0.95))
    fake = lambda run_config: {  # noqa: E731
        "method": run_config.method, "sparsity": run_config.sparsity, "seed": run_config.seed,
        "test_accuracy": 0.5, "training_flops_ratio": 0.05, "inference_flops_ratio": 0.05,
        "measured_sparsity": run_config.sparsity, "wall_time_s": 0.0, "steps": 4}
    fourth = reproduce.sweep(bigger, run_fn=fake, log=lambda line: None)
    assert fourth["new_runs"] == 2  # static and rigl at 0.95


def test_reproduce_summarize_only_trains_nothing(tmp_path):
    def fake(run_config):
        return {"method": run_config.method, "sparsity": run_config.sparsity,
                "seed": run_config.seed, "test_accuracy": 0.5 + 0.1 * run_config.seed,
                "training_flops_ratio": 0.1, "inference_flops_ratio": 0.1,
                "measured_sparsity": run_config.sparsity, "wall_time_s": 0.0, "steps": 4,
                "preset": run_config.preset}

    config = reproduce.SweepConfig(methods=("static", "rigl"), sparsities=(0.9,), seeds=1,
                                   output_dir=str(tmp_path), preset="official_mnist")
    assert reproduce.sweep(config, run_fn=fake, log=lambda line: None)["new_runs"] == 2

    def must_not_run(run_config):
        raise AssertionError("summarize_only trained a run")

    lines = []
    bigger = dataclasses.replace(config, seeds=2, summarize_only=True)
    summary = reproduce.sweep(bigger, run_fn=must_not_run, log=lines.append)
    assert summary["new_runs"] == 0 and len(summary["rows"]) == 2
    assert "2 missing: static S=0.9 seed 1, rigl S=0.9 seed 1" in lines[0]
    table = (tmp_path / "results.md").read_text()
    assert "| RigL | 50.00 |" in table and "official_mnist preset" in table
    assert "over the seeds present (seeds 0; 1 to 1 per cell)" in table  # 2 asked for
    assert "fc1 at S, fc2 at 0.9·S, logits dense" in table


def test_reproduce_plan_trains_dense_once_per_seed():
    config = reproduce.SweepConfig(methods=("dense", "rigl"), sparsities=(0.8, 0.9), seeds=2)
    runs = reproduce.plan(config)
    assert len(runs) == 2 * (1 + 2)
    assert sum(r.method == "dense" for r in runs) == 2
    with pytest.raises(ValueError, match="Unknown methods"):
        reproduce.plan(dataclasses.replace(config, methods=("magic",)))


# ---------------------------------------------------------------------------
# CIFAR-10 and ImageNet (TFDS mock data)
# ---------------------------------------------------------------------------


@tensorflow_only
def test_cifar10_wrn_with_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=8):
        results = cifar10_wrn.run(
            method="rigl", sparsity=0.8, batch_size=4, image_size=8, wrn_depth=10,
            train_steps=4, end_step=3, delta_t=2, lr_drop_steps="2", steps_per_epoch=2,
            test_limit=4, verbose=0, output_dir=str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert REQUIRED_KEYS <= set(saved)
    assert saved["steps"] == 4 and saved["model"] == "wrn_10_2"
    assert saved["measured_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert results["data_source"] == "tfds:cifar10"


def test_cifar10_schedule_scales_with_multiplier():
    steps = cifar10_wrn.schedule_steps(cifar10_wrn.Config(multiplier=2.0))
    assert steps["total"] == 2 * 97656 and steps["end"] == 150000
    assert steps["boundaries"] == [60000, 120000, 180000]
    assert (steps["prune_begin"], steps["prune_end"]) == (40000, 150000)
    assert cifar10_wrn.schedule_steps(cifar10_wrn.Config(max_steps=10))["run"] == 10
    model = cifar10_wrn.wide_resnet(22, 2)
    assert model.count_params() == pytest.approx(1.1e6, rel=0.1)  # WRN-22-2


@tensorflow_only
def test_imagenet_resnet_with_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=8):
        results = imagenet_resnet50.run(
            method="set", sparsity=0.8, batch_size=2, image_size=32, resnet_blocks="1,1,1,1",
            resnet_width=0.25, train_steps=3, end_step=2, delta_t=1, warmup_epochs=1,
            lr_drop_epochs="1", num_train_examples=4, test_limit=2, verbose=0,
            strategy="mirrored", output_dir=str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert REQUIRED_KEYS <= set(saved) and "top5_accuracy" in saved
    assert saved["steps"] == 3 and saved["model"] == "resnet14"
    assert saved["strategy"] == "mirrored"
    # Uniform keeps the first layer dense: measured sparsity is a bit below S.
    assert 0.7 < saved["measured_sparsity"] < 0.8
    assert results["inference_flops_ratio"] > 0.2


@pytest.fixture(scope="module")
def resnet50():
    return imagenet_resnet50.resnet()


def test_imagenet_recipe(resnet50):
    config = imagenet_resnet50.Config()
    steps = imagenet_resnet50.schedule_steps(config)
    per_epoch = 1281167 / 4096
    assert steps["total"] == 32000 and steps["end"] == 25000
    assert (steps["prune_begin"], steps["prune_end"], steps["prune_frequency"]) == (
        10000, 25000, 1000)
    assert steps["warmup"] == round(5 * per_epoch)
    assert steps["boundaries"] == [round(e * per_epoch) for e in (30, 70, 90)]
    doubled = imagenet_resnet50.schedule_steps(dataclasses.replace(config, multiplier=2.0))
    assert doubled["total"] == 64000 and doubled["end"] == 50000
    assert doubled["boundaries"] == [round(2 * e * per_epoch) for e in (30, 70, 90)]
    half_batch = imagenet_resnet50.schedule_steps(dataclasses.replace(config, batch_size=2048))
    assert half_batch["total"] == 64000 and half_batch["warmup"] == round(5 * 2 * per_epoch)

    schedule = imagenet_resnet50.WarmupStepDecay(1.6, 100, [200, 300], 0.1)
    lr = [float(schedule(s)) for s in (0, 50, 100, 250, 350)]
    assert lr == pytest.approx([0.0, 0.8, 1.6, 0.16, 0.016])
    assert resnet50.count_params() == 25610152  # ResNet-50


def test_flops_adapter_matches_paper_for_resnet50(resnet50):
    import rigl_keras

    model = resnet50
    uniform = common.flops_ratios(rigl_keras.sparsify(model, 0.8, "uniform"), "static")
    erk = common.flops_ratios(rigl_keras.sparsify(model, 0.8, "erk"), "rigl")
    # Paper, Figure 2-left: 0.23x (uniform) and 0.42x (ERK) at S = 0.8.
    assert uniform["inference_flops_ratio"] == pytest.approx(0.23, abs=0.01)
    assert erk["inference_flops_ratio"] == pytest.approx(0.42, abs=0.01)
    with pytest.raises(ValueError, match="dense_model"):
        common.flops_ratios(model, "small_dense")
