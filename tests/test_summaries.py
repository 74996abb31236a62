"""TensorBoard summaries: written whatever the callback order, read back from the event files."""

import glob

import keras
import numpy as np
import pytest

import rigl_keras as rk

tf = pytest.importorskip("tensorflow")


def _events(log_dir):
    scalars, images = {}, set()
    for path in glob.glob(f"{log_dir}/events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "images":
                    images.add(value.tag)
                else:
                    scalars.setdefault(value.tag, []).append(
                        (event.step, float(tf.make_ndarray(value.tensor))))
    return scalars, images


@pytest.mark.parametrize("summaries_first", [True, False])
def test_summaries_written_whatever_the_order(tmp_path, summaries_first):
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="fc1"),
                              keras.layers.Dense(3, name="out")])
    sparse = rk.sparsify(model, 0.75, "erk")
    sparse.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 16), dtype="float32"), rng.integers(0, 3, 64)
    summaries = rk.SparsitySummaries(str(tmp_path))
    rigl = rk.RigLCallback(delta_t=2, end_step=0.9)
    callbacks = [summaries, rigl] if summaries_first else [rigl, summaries]
    history = sparse.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=callbacks)

    scalars, images = _events(str(tmp_path))
    assert {"sparsity/fc1", "sparsity/out", "sparsity/overall", "updates/connections_changed",
            "updates/drop_fraction", "updates/itop_rate"} <= set(scalars)
    assert images == {"connectivity/fc1"}  # 16 inputs = a 4×4 image
    updates = sum(history.history["mask_updates"])
    assert len(scalars["updates/connections_changed"]) == updates
    assert sum(v for _, v in scalars["updates/connections_changed"]) == sum(
        history.history["connections_changed"])
    assert all(v == pytest.approx(0.75, abs=0.02) for _, v in scalars["sparsity/overall"])
    itop = [v for _, v in sorted(scalars["updates/itop_rate"])]
    assert itop == sorted(itop) and itop[-1] > 0.25  # rewiring explored new positions
    assert not hasattr(sparse, "_rigl_summaries")


def test_bad_log_dir():
    with pytest.raises(ValueError, match="log_dir"):
        rk.SparsitySummaries("")
