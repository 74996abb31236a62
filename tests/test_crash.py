"""Crash harness: SIGKILLed training runs, resumed from `BackupAndRestore`, every method.

Each scenario runs `tests/crash_worker.py` (a 12-step sparse training with
`keras.callbacks.BackupAndRestore(double_checkpoint=True)` after the method's
callbacks) in child processes on this backend; every child SIGKILLs itself at a
chosen point (after an update step, after a non-update step, inside a
checkpoint write), the next child restarts the same training from the backup,
and the last restart runs here, in the test process, with the same code. The
finished model must hold every invariant (`rigl_keras.check_sparsity` with the
exact expected counts), and with `save_freq="epoch"` it must equal an
uninterrupted run. Children run two at a time, started once for the module
(about 100 s of CPU time per backend).

Further scenarios pin down what the recommended setup does not protect against
(README, "Reliability"): a kill inside the very first checkpoint write, a kill
between the weights file and `training_metadata.json`, inside the metadata
write, or inside the final clean-up, and `BackupAndRestore` placed before SNIP.
"""

import concurrent.futures
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import h5py
import keras
import numpy as np
import pytest

import rigl_keras as rk

import crash_worker as worker

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

BACKEND = keras.backend.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLED = -getattr(signal, "SIGKILL", 9)  # a child's return code after its SIGKILL


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A training killed once per entry of `kills` (one child each), then resumed here."""

    method: str
    save_freq: str  # "epoch" or a number of batches
    kills: tuple
    single_checkpoint: bool = False
    backup_first: bool = False
    atomic: bool = False  # rigl_keras.AtomicBackupAndRestore instead of Keras' BackupAndRestore

    @property
    def freq(self):
        return self.save_freq if self.save_freq == "epoch" else int(self.save_freq)


# Optimizer steps: 4 per epoch, 12 in all; masks change after steps 2, 4, 6, 8
# (and 10 for prune; snip prunes after step 1, static never updates: see
# worker.UPDATE_STEPS, checked by `reference`); step 8 ends epoch 1.
# save_freq="epoch": killed inside epoch 1's backup write, right after update
# step 8 (rigl is first killed right after the mid-epoch update step 6, when
# only epoch 0's backup exists).
EPOCH_KILLS = {"rigl": ("step:6", "write:8")}
EPOCH = {f"{m}-epoch": Scenario(m, "epoch", EPOCH_KILLS.get(m, ("write:8",))) for m in worker.METHODS}
# save_freq=1: killed inside the backup of a non-update step, so that the
# restart falls back to the backup of the update step before it (snip: its
# pruning step 1; prune: its last pruning step 10); rigl is first killed right
# after the backup of update step 6.
STEP_KILLS = {"snip": ("write:2",), "prune": ("write:11",), "rigl": ("step:6", "write:7")}
STEP = {f"{m}-step": Scenario(m, "1", STEP_KILLS.get(m, ("write:7",))) for m in worker.METHODS}
# What the recommended setup does not cover. These are Keras' file handling
# (and one callback order), the same on every backend: run on JAX only, where
# a child costs least.
LIMITS = {
    "single-checkpoint": Scenario("rigl", "1", ("write:6",), single_checkpoint=True),
    "first-write": Scenario("rigl", "epoch", ("write:4",)),
    "between-files": Scenario("rigl", "epoch", ("between:8",)),
    "metadata-write": Scenario("rigl", "epoch", ("meta:8",)),
    "clean-up": Scenario("set", "epoch", ("cleanup",)),
    "snip-backup-first": Scenario("snip", "1", ("write:2",), backup_first=True),
}
# The same windows with rigl_keras.AtomicBackupAndRestore: each must resume exactly.
ATOMIC = {
    "atomic-first-write": Scenario("rigl", "epoch", ("write:4",), atomic=True),
    "atomic-write": Scenario("rigl", "epoch", ("write:8",), atomic=True),
    "atomic-between-files": Scenario("rigl", "epoch", ("between:8",), atomic=True),
    "atomic-metadata-write": Scenario("rigl", "epoch", ("meta:8",), atomic=True),
    "atomic-clean-up": Scenario("set", "epoch", ("cleanup",), atomic=True),
}
limits_only_on_jax = pytest.mark.skipif(
    BACKEND != "jax", reason="Keras' BackupAndRestore file handling, the same on every backend: tested on JAX")
SCENARIOS = {**EPOCH, **STEP, **LIMITS, **ATOMIC}
# Restoring is backend code: every epoch scenario runs on every backend. The
# step scenarios differ from them only in Keras' file handling: rigl's on
# every backend, the others on JAX (CI time).
EVERY_BACKEND = set(EPOCH) | {"rigl-step"}
all_but_rigl_only_on_jax = [
    pytest.param(name, marks=() if name in EVERY_BACKEND else limits_only_on_jax) for name in sorted(STEP)]


def _backup_files(workdir):
    """{file name: readable?} of the backup directory (h5 files: can HDF5 open it?)."""
    backup = os.path.join(workdir, "backup")
    files = {}
    for name in sorted(os.listdir(backup)) if os.path.isdir(backup) else []:
        readable = True
        if ".h5" in name:
            try:
                h5py.File(os.path.join(backup, name), "r").close()
            except OSError:
                readable = False
        files[name] = readable
    return files


def _run_children(scenario, workdir, cache_root):
    """Runs the killed children of `scenario` in turn; one record per child."""
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="3")
    if BACKEND == "jax":
        # Children share compiled programs through a persistent cache (6 s -> 3 s a
        # child), one per pool thread: JAX writes its cache files in place, unlocked.
        env.update(JAX_COMPILATION_CACHE_DIR=os.path.join(cache_root, f"jax_cache_{threading.get_ident()}"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    records = []
    for i, kill in enumerate(scenario.kills):
        command = [sys.executable, os.path.join(ROOT, "tests", "crash_worker.py"), scenario.method,
                   workdir, "--save-freq", scenario.save_freq, "--kill", kill]
        command += ["--single-checkpoint"] * scenario.single_checkpoint
        command += ["--backup-first"] * scenario.backup_first
        command += ["--atomic"] * scenario.atomic
        if i == 0 and scenario.save_freq == "epoch" and not scenario.backup_first:
            # The uninterrupted run, in a process of its own, computed where it costs least.
            command += ["--reference", os.path.join(workdir, "reference.npz")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        records.append({"kill": kill, "returncode": result.returncode, "stderr": result.stderr[-3000:],
                        "backup": _backup_files(workdir)})
        if result.returncode != KILLED:
            break
    return records


@pytest.fixture(scope="module")
def children(request, tmp_path_factory):
    """{scenario name: future of its child records}, for the scenarios this session selected."""
    # In the order the tests will ask for them, so that the test process resumes
    # one scenario while children run the next ones; two children at a time
    # (CI has 2 cores).
    names = []
    for item in request.session.items:
        name = getattr(getattr(item, "callspec", None), "params", {}).get("scenario")
        if item.module is request.module and name in SCENARIOS and name not in names:
            if BACKEND == "jax" or name in EVERY_BACKEND:
                names.append(name)
    base = tmp_path_factory.mktemp("crash")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    futures = {n: pool.submit(_run_children, SCENARIOS[n], str(base / n), str(base)) for n in names}
    yield {n: (str(base / n), future) for n, future in futures.items()}
    pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="module")
def deterministic():
    if BACKEND != "tensorflow":
        yield  # JAX and torch on CPU are deterministic already
        return
    from tensorflow.python.framework import config as tf_config  # has disable_op_determinism

    was_enabled = tf_config.is_op_determinism_enabled()
    tf_config.enable_op_determinism()
    yield
    if not was_enabled:
        tf_config.disable_op_determinism()


def require(condition, message):
    """A precondition of the scenario: fails the test (also an xfail one) with `pytest.fail`."""
    if not condition:
        pytest.fail(message, pytrace=False)


def killed(children, name):
    """The workdir and child records of scenario `name`, once every child died by its SIGKILL."""
    workdir, future = children[name]
    records = future.result()
    for record in records:
        require(record["returncode"] == KILLED,
                f"child with --kill {record['kill']} exited with {record['returncode']}:\n{record['stderr']}")
    return workdir, records


def require_interrupted_write(record):
    """A `write:` kill left latest.weights.h5 unreadable and, with double_checkpoint, a readable .bkp."""
    files = record["backup"]
    require(files.get("latest.weights.h5") is False and files.get("latest.weights.h5.bkp", True) is True,
            f"after --kill {record['kill']}: {files}")


def require_invariants(method, workdir):
    """`assert_invariants`, as a precondition of an xfail test."""
    try:
        assert_invariants(method, workdir)
    except AssertionError as error:
        pytest.fail(f"invariants broken: {error}", pytrace=False)


def resume(name, workdir, **overrides):
    """Restarts scenario `name` here, as its script would be restarted; returns the model."""
    scenario = SCENARIOS[name]
    options = dict(double_checkpoint=not scenario.single_checkpoint, backup_first=scenario.backup_first,
                   atomic=scenario.atomic)
    return worker.run(scenario.method, workdir, scenario.freq, **(options | overrides))


def reference(method, workdir):
    """The state after an uninterrupted run of `method`: from the first child of
    the scenario in `workdir` (see `_run_children`), or computed here."""
    path = os.path.join(workdir, "reference.npz")
    if not os.path.exists(path):
        return worker.reference(method)[0]
    with np.load(path) as arrays:
        # The kill points are where the comments above say: masks change after exactly these steps.
        assert tuple(arrays["update_steps"]) == worker.UPDATE_STEPS[method]
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files) - 1)]


def assert_same_state(expected, actual):
    assert len(expected) == len(actual)
    for i, (a, b) in enumerate(zip(expected, actual)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7, err_msg=f"variable {i}")


def steps(model):
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def assert_invariants(method, workdir):
    """The model the restarted training saved holds every invariant, with the exact expected counts."""
    final = keras.models.load_model(os.path.join(workdir, "final.keras"))
    expected = worker.expected_counts(method)
    assert sorted(w.name for w in rk.masked_weights(final)) == sorted(expected)
    rk.check_sparsity(final, expected)
    return final


def assert_backups_hold_invariants(method, workdir):
    """Every readable weights file in the backup holds every invariant (and, but for prune, the counts)."""
    counts = None if method == "prune" else worker.expected_counts(method)
    checked = []
    for name, readable in _backup_files(workdir).items():
        if ".h5" in name and readable:
            copy = os.path.join(workdir, "check.weights.h5")  # load_weights wants this suffix
            shutil.copyfile(os.path.join(workdir, "backup", name), copy)
            model, _ = worker.build(method)
            model.optimizer.build(model.trainable_variables)
            model.load_weights(copy)
            rk.check_sparsity(model, counts)
            checked.append(name)
    assert checked


@pytest.mark.parametrize("scenario", sorted(EPOCH))
def test_kill_inside_epoch_checkpoint_write_resumes_exactly(scenario, children, deterministic):
    """Killed inside the end-of-epoch-1 backup (right after update step 8): the restart
    falls back to the epoch-0 backup and ends exactly where an uninterrupted run ends."""
    workdir, records = killed(children, scenario)
    if len(records) == 2:  # killed after update step 6: nothing newer than epoch 0's backup
        assert records[0]["backup"] == {"latest.weights.h5": True, "training_metadata.json": True}
    require_interrupted_write(records[-1])
    assert records[-1]["backup"]["latest.weights.h5.bkp"] is True
    assert_backups_hold_invariants(SCENARIOS[scenario].method, workdir)
    model = resume(scenario, workdir)
    assert model.epochs_run == 2  # epochs 1 and 2 again
    assert steps(model) == worker.EPOCHS * worker.STEPS_PER_EPOCH
    assert_same_state(reference(SCENARIOS[scenario].method, workdir), worker.state(model))
    assert_invariants(SCENARIOS[scenario].method, workdir)


@pytest.mark.parametrize("scenario", all_but_rigl_only_on_jax)
def test_kills_with_step_checkpoints_keep_every_invariant(scenario, children, deterministic):
    """save_freq=1: killed inside the backup of one step and after the backup of another
    (update and non-update steps), each restart resumes; the end holds every invariant."""
    workdir, records = killed(children, scenario)
    for record in records:
        if record["kill"].startswith("write:"):
            require_interrupted_write(record)
    assert_backups_hold_invariants(SCENARIOS[scenario].method, workdir)
    model = resume(scenario, workdir)
    # Keras restarts the interrupted epoch at batch 0 with the step count kept:
    # each step-level restart trains more steps than the uninterrupted run.
    assert steps(model) > worker.EPOCHS * worker.STEPS_PER_EPOCH
    assert_invariants(SCENARIOS[scenario].method, workdir)
    assert not os.path.exists(os.path.join(workdir, "backup"))  # deleted once training ended


@limits_only_on_jax
@pytest.mark.parametrize("scenario", ["single-checkpoint"])
def test_without_double_checkpoint_a_killed_write_loses_the_backup(scenario, children):
    """The failure of issue #15: save_freq=1, killed inside a backup write, no double checkpoint."""
    workdir, [record] = killed(children, scenario)
    require(record["backup"] == {"latest.weights.h5": False, "training_metadata.json": True}, record["backup"])
    with pytest.raises(OSError, match="Unable to synchronously open file"):
        resume(scenario, workdir)


@limits_only_on_jax
@pytest.mark.parametrize("scenario", ["first-write"])
def test_kill_inside_the_first_backup_write_needs_the_backup_deleted(scenario, children, deterministic):
    """double_checkpoint keeps the previous backup: there is none while the first one is written."""
    workdir, [record] = killed(children, scenario)
    require(record["backup"] == {"latest.weights.h5": False}, record["backup"])
    with pytest.raises(OSError, match="Unable to synchronously open file"):
        resume(scenario, workdir)
    # Nothing was saved yet: deleting the backup restarts from scratch, exactly.
    shutil.rmtree(os.path.join(workdir, "backup"))
    model = resume(scenario, workdir)
    assert_same_state(reference("rigl", workdir), worker.state(model))


@limits_only_on_jax
def test_kept_backup_makes_a_rerun_of_a_finished_fit_return_the_trained_model(tmp_path, deterministic):
    """delete_checkpoint=False leaves no clean-up to be killed in (see the clean-up
    scenario below): rerunning a finished job restores its end state and trains nothing."""
    first = worker.state(worker.run("set", str(tmp_path), delete_checkpoint=False))
    again = worker.run("set", str(tmp_path), delete_checkpoint=False)
    assert again.epochs_run == 0
    assert_same_state(first, worker.state(again))


@limits_only_on_jax
@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "Keras 3.15 BackupAndRestore writes latest.weights.h5, then training_metadata.json, each in "
    "place: killed between the two, the restart pairs epoch 2's weights with epoch 1's epoch "
    "number and trains one epoch too many (no atomic backup callback in rigl_keras yet)"))
@pytest.mark.parametrize("scenario", ["between-files"])
def test_kill_between_weights_and_metadata_resumes_exactly(scenario, children, deterministic):
    workdir, [record] = killed(children, scenario)
    require(record["backup"]["latest.weights.h5"] is True, record["backup"])
    model = resume(scenario, workdir)
    require_invariants("rigl", workdir)  # they hold; the run is one epoch too long:
    assert steps(model) == worker.EPOCHS * worker.STEPS_PER_EPOCH
    assert_same_state(reference("rigl", workdir), worker.state(model))


@limits_only_on_jax
@pytest.mark.xfail(strict=True, raises=json.JSONDecodeError, reason=(
    "Keras 3.15 BackupAndRestore opens training_metadata.json with mode 'w' in place: killed "
    "inside that write, the file is empty and the restart fails with JSONDecodeError, which "
    "double_checkpoint does not catch (it falls back only on OSError)"))
@pytest.mark.parametrize("scenario", ["metadata-write"])
def test_kill_inside_metadata_write_resumes(scenario, children, deterministic):
    workdir, [record] = killed(children, scenario)
    require(record["backup"]["latest.weights.h5"] is True, record["backup"])
    model = resume(scenario, workdir)
    assert_same_state(reference("rigl", workdir), worker.state(model))


@limits_only_on_jax
@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "Keras 3.15 BackupAndRestore deletes its directory at the end of fit with rmtree: killed "
    "after the weights files are gone and before training_metadata.json is, the restart reads "
    "epoch 3 of 3, trains nothing and returns the untrained initial model"))
@pytest.mark.parametrize("scenario", ["clean-up"])
def test_kill_during_backup_clean_up_does_not_return_an_untrained_model(scenario, children, deterministic):
    workdir, [record] = killed(children, scenario)
    files = record["backup"]
    require("training_metadata.json" in files and not [n for n in files if "weights" in n], files)
    model = resume(scenario, workdir)
    require_invariants("set", workdir)  # they hold: it is the initial model
    assert_same_state(reference("set", workdir), worker.state(model))


@limits_only_on_jax
@pytest.mark.parametrize("scenario", ["snip-backup-first"])
def test_snip_resumed_from_a_backup_taken_before_its_pruning_refuses_to_train_dense(
        scenario, children, deterministic):
    # BackupAndRestore *before* SNIPCallback with a step save_freq: the backup
    # of step 1 is taken after the dense first step and before SNIP prunes.
    # Restored from it, SNIP cannot score the first batch again: it must say
    # so instead of training the restored dense model.
    workdir, [record] = killed(children, scenario)
    require_interrupted_write(record)
    with pytest.raises(ValueError, match="before SNIP's pruning step"):
        resume(scenario, workdir)


@limits_only_on_jax
@pytest.mark.parametrize("scenario", sorted(ATOMIC))
def test_atomic_backup_resumes_exactly_wherever_the_process_is_killed(scenario, children, deterministic):
    """AtomicBackupAndRestore closes every window above: killed inside the first or a later
    weights write, between the weights file and the metadata commit, inside the metadata
    write, or during the clean-up at the end of fit, the rerun ends exactly where an
    uninterrupted run ends (from the last complete backup, or from scratch)."""
    workdir, [record] = killed(children, scenario)
    files = record["backup"]
    if scenario == "atomic-clean-up":
        require("training_metadata.json" not in files, files)  # removed first
    else:
        require(any(name.startswith("backup-") for name in files), files)
    model = resume(scenario, workdir)
    method = SCENARIOS[scenario].method
    assert_same_state(reference(method, workdir), worker.state(model))
    assert_invariants(method, workdir)


def test_atomic_backup_refuses_a_keras_backup_directory(tmp_path):
    import json

    (tmp_path / "training_metadata.json").write_text(json.dumps({"epoch": 1, "batch": 0}))
    model, _ = worker.build("static")
    callback = rk.AtomicBackupAndRestore(str(tmp_path))
    callback.set_model(model)
    with pytest.raises(ValueError, match="not written by AtomicBackupAndRestore"):
        callback.on_train_begin()


@pytest.mark.parametrize("backup_class", ["keras", "atomic"])
def test_step_backup_listed_first_holds_the_update_of_its_step_only_with_the_atomic_backup(
        backup_class, tmp_path):
    model, _ = worker.build("rigl")
    rigl = rk.RigLCallback(delta_t=2, end_step=10)  # updates after steps 2 and 4
    directory = str(tmp_path / "backup")
    backup = (rk.AtomicBackupAndRestore(directory, save_freq=1, delete_checkpoint=False)
              if backup_class == "atomic" else
              keras.callbacks.BackupAndRestore(directory, save_freq=1, delete_checkpoint=False))
    x, y = worker.data()
    model.fit(x, y, batch_size=worker.BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[backup, rigl])
    [name] = [n for n in os.listdir(directory) if n.endswith(".weights.h5")]
    restored, _ = worker.build("rigl")
    restored.optimizer.build(restored.trainable_variables)
    restored.load_weights(os.path.join(directory, name))
    assert steps(restored) == 4
    same = all(np.array_equal(keras.ops.convert_to_numpy(a.mask), keras.ops.convert_to_numpy(b.mask))
               for a, b in zip(rk.masked_weights(model), rk.masked_weights(restored)))
    # Keras' backup of step 4 was written before the update of step 4 ran.
    assert same == (backup_class == "atomic")
