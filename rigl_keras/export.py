"""Sparse export: files that keep only the active weights, and their loader.

`export_sparse(model, path)` writes a NumPy ``.npz`` archive holding a JSON
header (format version, the plain model's Keras configuration, one entry per
variable) and, for every masked weight, only its active values plus where
they are: their flat indices (uint16 below 65,536 entries, else uint32) or a
bitmap of N/8 bytes, whichever is smaller. Every other variable is stored
dense. The file size is therefore about density × 4 bytes per masked entry
plus min(density × 2–4, 1/8) bytes of positions, plus the dense remainder.
`load_sparse(path)` rebuilds the plain Keras model (as `strip_masks` gives
it) with identical predictions; it does not need the masked classes.
"""

from __future__ import annotations

import json

import keras
import numpy as np

from rigl_keras import layers as masked_layers
from rigl_keras.sparsify import SparseModel, _base_variables, strip_masks

__all__ = ["FORMAT", "export_sparse", "load_sparse"]

#: Format tag written in every header.
FORMAT = "rigl_keras.sparse/1"


def export_sparse(model: keras.Model, path: str) -> dict:
    """Writes `model` with only its active weights to `path` (``.npz``).

    Args:
      model: a masked model (any model `strip_masks` accepts).
      path: the file to write; ".npz" is appended by NumPy if missing.

    Returns:
      A summary: {"masked_entries", "active_entries", "bytes_dense_equivalent"}.

    Raises:
      ValueError: if the model has no masked weight.
    """
    weights = masked_layers.masked_weights(model)
    if not weights:
        raise ValueError("`model` has no masked weight; save it with model.save instead.")
    masked = {id(w.variable): w for w in weights}
    plain = strip_masks(model)
    arrays, entries = {}, []
    source = model.model if isinstance(model, SparseModel) else model
    summary = {"masked_entries": 0, "active_entries": 0, "bytes_dense_equivalent": 0}
    for i, variable in enumerate(_base_variables(source)):
        value = keras.ops.convert_to_numpy(variable)
        entry = {"shape": list(value.shape), "dtype": str(value.dtype), "sparse": False}
        summary["bytes_dense_equivalent"] += value.nbytes
        w = masked.get(id(variable))
        if w is None:
            arrays[f"v{i}"] = value
        else:
            mask = keras.ops.convert_to_numpy(w.mask).reshape(-1) != 0
            index_dtype = np.uint16 if value.size < 2**16 else np.uint32
            if int(mask.sum()) * np.dtype(index_dtype).itemsize < (mask.size + 7) // 8:
                arrays[f"v{i}_indices"] = np.flatnonzero(mask).astype(index_dtype)
            else:
                arrays[f"v{i}_bitmap"] = np.packbits(mask)
            arrays[f"v{i}_values"] = value.reshape(-1)[mask]
            entry["sparse"] = True
            summary["masked_entries"] += int(value.size)
            summary["active_entries"] += int(mask.sum())
        entries.append(entry)
    header = {
        "format": FORMAT,
        "model": keras.saving.serialize_keras_object(plain),
        "variables": entries,
    }
    arrays["header"] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    np.savez(path, **arrays)
    return summary


def load_sparse(path: str) -> keras.Model:
    """Rebuilds the plain Keras model written by `export_sparse`.

    Args:
      path: the ``.npz`` file.

    Returns:
      An uncompiled plain Keras model (masked entries are exact zeros).

    Raises:
      ValueError: if the file is not a rigl_keras sparse export, or its
        variables do not match the model it describes.
    """
    with np.load(path) as data:
        if "header" not in data:
            raise ValueError(f"{path!r} is not a rigl_keras sparse export (no header).")
        header = json.loads(bytes(data["header"]).decode("utf-8"))
        if header.get("format") != FORMAT:
            raise ValueError(f"{path!r}: unknown format {header.get('format')!r}; expected {FORMAT!r}.")
        model = keras.saving.deserialize_keras_object(header["model"])
        variables = model.weights
        if len(variables) != len(header["variables"]):
            raise ValueError(
                f"{path!r} holds {len(header['variables'])} variables; the model it "
                f"describes has {len(variables)}."
            )
        for i, (variable, entry) in enumerate(zip(variables, header["variables"])):
            if entry["sparse"]:
                size = int(np.prod(entry["shape"]))
                value = np.zeros(size, dtype=entry["dtype"])
                if f"v{i}_indices" in data:
                    where = data[f"v{i}_indices"].astype(np.int64)
                else:
                    where = np.unpackbits(data[f"v{i}_bitmap"])[:size].astype(bool)
                value[where] = data[f"v{i}_values"]
                value = value.reshape(entry["shape"])
            else:
                value = data[f"v{i}"]
            if list(value.shape) != [int(d) for d in variable.shape]:
                raise ValueError(f"{path!r}: variable {i} has shape {value.shape}, "
                                 f"expected {tuple(variable.shape)}.")
            variable.assign(value)
    return model
