"""A training backup that a killed process can never leave half-written.

Keras' `BackupAndRestore` writes its weights file and then its metadata file
in place: a process killed inside either write, between them, or while the
backup directory is deleted at the end of `fit` can leave a backup that
fails to load, resumes one epoch off, or restores an untrained model
(`tests/test_crash.py` reproduces each). `AtomicBackupAndRestore` keeps the
same interface and makes every backup a single atomic step.
"""

from __future__ import annotations

import json
import os
import shutil

import keras

__all__ = ["AtomicBackupAndRestore", "write_file_atomically"]

_METADATA = "training_metadata.json"
_remove_tree = shutil.rmtree  # a module attribute, so that the crash tests can interrupt it


def _sync_directory(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file_atomically(path: str, data: bytes) -> None:
    """Replaces `path` by `data` so that a crash leaves either the old or the new file.

    Writes a temporary file next to it, syncs it to disk, renames it over
    `path` (`os.replace`, atomic on POSIX and Windows) and syncs the directory.
    """
    temporary = path + ".tmp"
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    _sync_directory(os.path.dirname(path) or ".")


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` whose every backup is all or nothing.

    Each backup writes the weights (model and optimizer) to a new file,
    syncs it, and then commits it by atomically replacing the metadata file,
    which names that weights file next to the epoch; only then is the
    previous weights file removed. At any moment the metadata file names a
    complete backup, or there is none, so a process killed anywhere (inside
    a write, between the two, or while `fit` deletes the backup at its end:
    the metadata goes first) restarts from the last complete backup, or from
    scratch if none was made. Resume is as exact as Keras' own: exact at
    epoch granularity (`save_freq="epoch"`); a step `save_freq` restarts the
    interrupted epoch from its first batch.

    A step backup due after a batch is written when the next batch begins
    (or the epoch ends), once every callback has finished that batch: a
    connectivity update made by a sparse-training callback listed after this
    one is in the backup, whatever the order of the list.

    Local file systems only (it uses `os` directly, not `tf.io.gfile`). A
    directory written by Keras' `BackupAndRestore` is not read.

    Args:
      backup_dir: directory of the backup, created if needed.
      save_freq: "epoch" or a number of batches between backups.
      delete_checkpoint: delete the backup when `fit` ends.

    Raises:
      ValueError: for an empty `backup_dir` or a bad `save_freq`; at train
        begin, for an unbuilt model or a metadata file this class did not
        write.
    """

    def __init__(self, backup_dir: str, save_freq="epoch", delete_checkpoint: bool = True):
        super().__init__(backup_dir, save_freq=save_freq, double_checkpoint=False,
                         delete_checkpoint=delete_checkpoint)
        self._metadata_path = os.path.join(backup_dir, _METADATA)
        self._saves = 0
        self._due = False

    def get_config(self) -> dict:
        """The constructor arguments."""
        return {"backup_dir": self.backup_dir, "save_freq": self.save_freq,
                "delete_checkpoint": self.delete_checkpoint}

    def on_train_begin(self, logs=None):
        self._due = False
        self._load_model()

    def on_train_batch_end(self, batch, logs=None):
        if self._should_save_on_batch(batch):
            self._due = True  # written once every callback is done with this batch

    def on_train_batch_begin(self, batch, logs=None):
        self._save_if_due()

    def on_epoch_end(self, epoch, logs=None):
        self._save_if_due()
        super().on_epoch_end(epoch, logs)

    def _save_if_due(self):
        if self._due:
            self._due = False
            self._save_model()

    def _load_model(self):
        if not self.model.built:
            raise ValueError(
                "AtomicBackupAndRestore needs a built model before `fit` (call it on a batch).")
        if not os.path.exists(self._metadata_path):
            return  # no backup was completed: start from scratch
        with open(self._metadata_path, encoding="utf-8") as f:
            metadata = json.load(f)
        if "weights" not in metadata:
            raise ValueError(
                f"{self._metadata_path} was not written by AtomicBackupAndRestore (a Keras "
                "BackupAndRestore directory?); use another backup_dir.")
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self.model.load_weights(os.path.join(self.backup_dir, metadata["weights"]))
        self.model._initial_epoch = metadata["epoch"]
        self._saves = int(metadata["save"])

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        self._saves += 1
        name = f"backup-{self._saves}.weights.h5"
        path = os.path.join(self.backup_dir, name)
        self.model.save_weights(path, overwrite=True)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        metadata = {"epoch": self._current_epoch, "batch": self._last_batch_seen,
                    "weights": name, "save": self._saves}
        write_file_atomically(self._metadata_path, json.dumps(metadata).encode("utf-8"))
        for old in os.listdir(self.backup_dir):  # earlier backups and half-written ones
            if old.endswith(".weights.h5") and old != name:
                os.remove(os.path.join(self.backup_dir, old))

    def on_train_end(self, logs=None):
        if self.delete_checkpoint and os.path.exists(self.backup_dir):
            if os.path.exists(self._metadata_path):
                os.remove(self._metadata_path)  # first: nothing half-deleted can be resumed
                _sync_directory(self.backup_dir)
            _remove_tree(self.backup_dir)
