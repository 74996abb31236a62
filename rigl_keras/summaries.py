"""TensorBoard summaries of sparse training (the role of tfmot's PruningSummaries, and more).

`SparsitySummaries(log_dir)` writes, at every connectivity update of any
rigl_keras callback and at every epoch end:

* ``sparsity/<weight name>`` and ``sparsity/overall``;
* ``updates/connections_changed`` and ``updates/<fraction key>`` (drop fraction,
  or pruning's target sparsity) at each update;
* ``updates/itop_rate``: the in-time over-parameterisation rate (Liu et al.
  2021), the fraction of all masked positions that have been active at some
  point since this fit began;
* ``connectivity/<first weight>`` (epoch end): an image of the number of
  active connections of each input unit of the first masked weight, when the
  model's input is an image whose size matches that weight's fan-in.

It hooks into the sparse-training callbacks through the model, so its place
in the callback list does not matter. Writing uses `tf.summary`, so
TensorFlow must be installed (any Keras backend works).
"""

from __future__ import annotations

import keras
import numpy as np

from rigl_keras import layers as masked_layers

__all__ = ["SparsitySummaries"]


class SparsitySummaries(keras.callbacks.Callback):
    """Writes per-weight sparsity, update statistics, ITOP rate and connectivity to TensorBoard.

    Args:
      log_dir: directory of the event files (e.g. the `TensorBoard`
        callback's `log_dir` + "/sparsity").

    Raises:
      ValueError: if `log_dir` is not a non-empty string, or TensorFlow (for
        `tf.summary`) is not installed.
    """

    def __init__(self, log_dir: str):
        super().__init__()
        if not isinstance(log_dir, str) or not log_dir:
            raise ValueError(f"`log_dir` must be a non-empty string; got {log_dir!r}.")
        try:
            import tensorflow  # noqa: F401
        except ImportError as error:  # pragma: no cover - TF is in the test extra
            raise ValueError("SparsitySummaries writes with tf.summary: install tensorflow.") from error
        self.log_dir = log_dir
        self._writer = None
        self._ever: dict[str, np.ndarray] = {}

    def get_config(self) -> dict:
        """The constructor arguments."""
        return {"log_dir": self.log_dir}

    @classmethod
    def from_config(cls, config: dict):
        """Rebuilds the callback from `get_config()`."""
        return cls(**config)

    # -- hooks ---------------------------------------------------------------
    def on_train_begin(self, logs=None):
        import tensorflow as tf

        model = self.model
        self._writer = tf.summary.create_file_writer(self.log_dir)
        self._ever = {}
        self._observe(model)
        # The sparse-training callbacks report every update here (`record`).
        object.__setattr__(model, "_rigl_summaries", self)

    def on_epoch_end(self, epoch, logs=None):
        model = self.model
        step = self._step(model)
        self._write_sparsity(model, step)
        self._write_connectivity(model, step)

    def on_train_end(self, logs=None):
        model = self.model
        if getattr(model, "_rigl_summaries", None) is self:
            object.__delattr__(model, "_rigl_summaries")
        if self._writer is not None:
            self._writer.flush()

    def on_update(self, model, step: int, fraction_key: str, fraction: float, changed: int) -> None:
        """Called by the sparse-training callbacks after every connectivity update."""
        self._write_sparsity(model, step, {
            "updates/connections_changed": float(changed),
            f"updates/{fraction_key}": float(fraction),
        })

    # -- helpers -------------------------------------------------------------
    @staticmethod
    def _step(model) -> int:
        return int(keras.ops.convert_to_numpy(model.optimizer.iterations)) if model.optimizer else 0

    def _observe(self, model) -> dict[str, np.ndarray]:
        masks = {}
        for w in masked_layers.masked_weights(model):
            mask = keras.ops.convert_to_numpy(w.mask) != 0
            masks[w.name] = mask
            self._ever[w.name] = mask | self._ever.get(w.name, False)
        return masks

    def _write_sparsity(self, model, step: int, extra: dict | None = None) -> None:
        import tensorflow as tf

        masks = self._observe(model)
        total = sum(m.size for m in masks.values()) or 1
        scalars = {f"sparsity/{name}": 1.0 - float(m.mean()) for name, m in masks.items()}
        scalars["sparsity/overall"] = 1.0 - sum(int(m.sum()) for m in masks.values()) / total
        scalars["updates/itop_rate"] = sum(int(e.sum()) for e in self._ever.values()) / total
        scalars.update(extra or {})
        with self._writer.as_default(step=step):
            for tag, value in scalars.items():
                tf.summary.scalar(tag, value)
        self._writer.flush()

    def _write_connectivity(self, model, step: int) -> None:
        import tensorflow as tf

        weights = masked_layers.masked_weights(model)
        inputs = getattr(model, "inputs", None)
        if not weights or not inputs or len(inputs) != 1:
            return
        shape = tuple(int(d) for d in inputs[0].shape[1:] if d is not None)
        image_like = len(shape) == 3 or (len(shape) == 1 and int(np.sqrt(shape[0])) ** 2 == shape[0])
        first = weights[0]
        mask = keras.ops.convert_to_numpy(first.mask) != 0
        if not image_like or mask.ndim != 2 or mask.shape[0] != int(np.prod(shape)):
            return
        per_input = mask.sum(axis=1).astype("float32")
        side = shape[:2] if len(shape) == 3 else (int(np.sqrt(shape[0])),) * 2
        channels = shape[2] if len(shape) == 3 else 1
        image = per_input.reshape(side + (channels,)).sum(axis=-1, keepdims=True)
        image = image / max(float(image.max()), 1.0)
        with self._writer.as_default(step=step):
            tf.summary.image(f"connectivity/{first.name}", image[None])
        self._writer.flush()
