"""A short sparse training that can be SIGKILLed at a chosen point, and resumed.

The child process of `tests/test_crash.py` (also importable, so that a test can
run the same training in its own process):

    python tests/crash_worker.py METHOD WORKDIR [--save-freq epoch|N] [--kill SPEC]
                                 [--single-checkpoint] [--backup-first] [--atomic] [--reference NPZ]

trains METHOD (static, snip, set, snfs, rigl, prune) on a tiny MLP and synthetic
data (3 epochs × 4 steps; masks change after optimizer steps 2, 4, 6 and 8,
and 10 for prune; snip prunes once, after step 1; static never) with
`keras.callbacks.BackupAndRestore(WORKDIR/backup, save_freq, double_checkpoint=True)`
placed after the method's callbacks, and at the end saves the model to
WORKDIR/final.keras. Run again with the same arguments, it resumes from the
backup. SPEC says where the process SIGKILLs itself (N is the value of
`optimizer.iterations`, i.e. the number of steps trained):

  step:N     at the end of the batch that brings the step count to N, after
             every callback (the method's update, the backup's save) ran;
  write:N    inside the backup of step N, after 3 variables of
             latest.weights.h5 are written: the file is left as a real
             interrupted HDF5 write leaves it;
  between:N  after the backup of step N wrote its weights file, before it
             writes training_metadata.json;
  meta:N     inside the backup of step N, once training_metadata.json has been
             opened (truncated) for writing, before anything is written to it;
  cleanup    in `fit`'s last moment, when `BackupAndRestore` deletes its
             directory: after the weights files are deleted, before the
             metadata file is.

With --atomic the backup is `rigl_keras.AtomicBackupAndRestore`, and the kill
points are its own: write:N inside its weights file (`backup-K.weights.h5`),
between:N after that file is written and synced, before the metadata commit,
meta:N inside the write of the temporary metadata file, and cleanup after
`fit`'s deletion of the backup removed the metadata, before the rest.

Every kill is an `os.kill(os.getpid(), signal.SIGKILL)`: no Python cleanup runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if __name__ == "__main__" and os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
    # Keras imports TensorFlow, if installed, whatever the backend (3 s a process);
    # the child runs as on a machine without it (the core needs only keras and numpy).
    sys.modules["tensorflow"] = None
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import rigl_keras as rk  # noqa: E402
from rigl_keras import baselines  # noqa: E402

METHODS = ("static", "snip", "set", "snfs", "rigl", "prune")
SPARSITY = 0.8
ROWS, BATCH, EPOCHS = 128, 32, 3  # 4 steps per epoch, 12 in all
STEPS_PER_EPOCH = ROWS // BATCH
#: Optimizer steps after which masks change (snip: step 1 only; static: never).
UPDATE_STEPS = {"static": (), "snip": (1,), "set": (2, 4, 6, 8), "snfs": (2, 4, 6, 8),
                "rigl": (2, 4, 6, 8), "prune": (2, 4, 6, 8, 10)}
#: Weights written to latest.weights.h5 before a `write:N` kill.
WRITES_BEFORE_KILL = 3


def enable_determinism() -> None:
    """TensorFlow's CPU kernels are deterministic only when asked; JAX and torch already are."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def mlp(width: float = 1.0) -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((20,)),
            keras.layers.Dense(max(1, round(32 * width)), activation="relu", name="fc1"),
            keras.layers.Dense(max(1, round(16 * width)), activation="relu", name="fc2"),
            keras.layers.Dense(5, name="out"),
        ],
        name="mlp",
    )


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, 20)).astype("float32")
    return x, np.argmax(x @ rng.normal(size=(20, 5)).astype("float32"), axis=1)


def set_seed(seed: int) -> None:
    """`keras.utils.set_random_seed`, without importing TensorFlow on the other backends (3 s)."""
    if keras.backend.backend() == "tensorflow":
        keras.utils.set_random_seed(seed)
        return
    import random

    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator
    from keras.src.utils import rng_utils

    global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, seed)
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    random.seed(seed)
    np.random.seed(seed)
    if keras.backend.backend() == "torch":
        import torch

        torch.manual_seed(seed)


def build(method: str):
    """(model, callbacks): the same initial state in every process."""
    set_seed(7)
    model, callbacks = baselines.get(method).build(
        mlp, SPARSITY, delta_t=2, end_step=0.8, seed=3,
        prune_frequency=2, prune_end_step=0.8)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, callbacks


def expected_counts(method: str) -> dict:
    """{weight name: active count} every masked weight must have at the end of training."""
    dense = mlp()
    if method == "prune":  # uniform final sparsity on every weight
        sparsities = {w.name: SPARSITY for w in rk.masked_weights(rk.sparsify(dense, 0.0))}
    else:
        sparsities = rk.sparsity_distribution(dense, SPARSITY, "erk")
    sizes = {name: int(np.prod(layer.kernel.shape)) for name, layer in
             ((layer.name, layer) for layer in dense.layers)}
    return {name: rk.active_count(sizes[name], s) for name, s in sparsities.items()}


def state(model) -> list:
    """Every variable of the model and of its optimizer, by position."""
    return [np.array(keras.ops.convert_to_numpy(v)) for v in
            list(model.variables) + list(model.optimizer.variables)]


class MaskChanges(keras.callbacks.Callback):
    """Records the optimizer steps after which some mask changed."""

    def on_train_begin(self, logs=None):
        self.steps, self.masks = [], self._masks()

    def _masks(self):
        return [keras.ops.convert_to_numpy(w.mask).copy() for w in rk.masked_weights(self.model)]

    def on_train_batch_end(self, batch, logs=None):
        masks = self._masks()
        if any(not np.array_equal(a, b) for a, b in zip(masks, self.masks)):
            self.steps.append(int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)))
        self.masks = masks


def reference(method: str):
    """(state, steps after which a mask changed) of an uninterrupted fit, without any backup."""
    model, callbacks = build(method)
    x, y = data()
    changes = MaskChanges()
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
              callbacks=callbacks + [changes])
    return state(model), tuple(changes.steps)


def _die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) == self.step:
            _die()


def _arm_atomic(kind: str, at_step) -> list:
    from keras.src.saving import saving_lib

    from rigl_keras import backup

    if kind == "write":
        original = saving_lib.H5IOStore.__setitem__
        written = {}

        def setitem(store, key, value):
            original(store, key, value)
            name = os.path.basename(str(store.path_or_io))
            if name.startswith("backup-") and at_step():
                written[id(store)] = written.get(id(store), 0) + 1
                if written[id(store)] == WRITES_BEFORE_KILL:
                    _die()

        saving_lib.H5IOStore.__setitem__ = setitem
    elif kind in ("between", "meta"):
        original_write = backup.write_file_atomically

        def write(path, data):
            if at_step():
                if kind == "meta":
                    with open(path + ".tmp", "wb") as f:
                        f.write(data[: len(data) // 2])
                _die()
            original_write(path, data)

        backup.write_file_atomically = write
    elif kind == "cleanup":
        def remove_tree(path):  # the metadata is already gone
            _die()

        backup._remove_tree = remove_tree
    else:
        raise ValueError(f"unknown kill point {kind!r}")
    return []


def arm(kill: str | None, model, atomic: bool = False) -> list:
    """Installs the kill described by `kill`; returns callbacks to append (after the backup)."""
    if not kill:
        return []
    kind, _, arg = kill.partition(":")
    if kind == "step":
        return [KillAtStep(int(arg))]

    from keras.src.saving import saving_lib
    from keras.src.utils import file_utils

    def at_step():
        return int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == int(arg)

    if atomic:
        return _arm_atomic(kind, at_step)
    if kind == "write":
        original = saving_lib.H5IOStore.__setitem__
        written = {}

        def setitem(store, key, value):
            original(store, key, value)
            if str(store.path_or_io).endswith("latest.weights.h5") and at_step():
                written[id(store)] = written.get(id(store), 0) + 1
                if written[id(store)] == WRITES_BEFORE_KILL:
                    _die()

        saving_lib.H5IOStore.__setitem__ = setitem
    elif kind in ("between", "meta"):
        original_open = file_utils.File

        def open_file(path, mode="r"):
            if str(path).endswith("training_metadata.json") and mode == "w" and at_step():
                if kind == "between":
                    _die()
                original_open(path, mode)  # truncates the previous metadata
                _die()
            return original_open(path, mode)

        file_utils.File = open_file
    elif kind == "cleanup":
        original_rmtree = file_utils.rmtree

        def rmtree(path):
            names = sorted(os.listdir(path), key=lambda n: "weights" not in n)
            for name in names:
                if "weights" not in name:
                    _die()
                os.remove(os.path.join(path, name))
            original_rmtree(path)

        file_utils.rmtree = rmtree
    else:
        raise ValueError(f"unknown kill point {kill!r}")
    return []


def run(method: str, workdir: str, save_freq="epoch", kill: str | None = None,
        double_checkpoint: bool = True, backup_first: bool = False, delete_checkpoint: bool = True,
        atomic: bool = False):
    """Trains `method` with a backup in `workdir` (resuming from it), killed as `kill` says.

    Returns the trained model, also saved as `workdir/final.keras`; its
    `epochs_run` attribute is the number of epochs this call trained.
    """
    model, callbacks = build(method)
    x, y = data()
    if atomic:
        backup = rk.AtomicBackupAndRestore(os.path.join(workdir, "backup"), save_freq=save_freq,
                                           delete_checkpoint=delete_checkpoint)
    else:
        backup = keras.callbacks.BackupAndRestore(
            os.path.join(workdir, "backup"), save_freq=save_freq,
            double_checkpoint=double_checkpoint, delete_checkpoint=delete_checkpoint)
    callbacks = [backup] + callbacks if backup_first else callbacks + [backup]
    callbacks += arm(kill, model, atomic)
    history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
                        callbacks=callbacks)
    model.epochs_run = len(history.history.get("loss", []))
    model.save(os.path.join(workdir, "final.keras"))
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("workdir")
    parser.add_argument("--save-freq", default="epoch")
    parser.add_argument("--kill", default=None)
    parser.add_argument("--single-checkpoint", action="store_true",
                        help="BackupAndRestore(double_checkpoint=False)")
    parser.add_argument("--backup-first", action="store_true",
                        help="put BackupAndRestore before the method's callbacks")
    parser.add_argument("--atomic", action="store_true",
                        help="rigl_keras.AtomicBackupAndRestore instead of Keras' BackupAndRestore")
    parser.add_argument("--reference", metavar="NPZ",
                        help="first run the training uninterrupted, without backup, and save its end state here")
    args = parser.parse_args(argv)
    save_freq = args.save_freq if args.save_freq == "epoch" else int(args.save_freq)
    enable_determinism()
    os.makedirs(args.workdir, exist_ok=True)
    if args.reference:
        end_state, update_steps = reference(args.method)
        np.savez(args.reference, *end_state, update_steps=np.array(update_steps, dtype="int64"))
    run(args.method, args.workdir, save_freq, args.kill,
        double_checkpoint=not args.single_checkpoint, backup_first=args.backup_first,
        atomic=args.atomic)


if __name__ == "__main__":
    main()
