"""Real architectures end to end: keras.applications, keras-hub backbones, RNNs.

For each model (random weights, small inputs, nothing downloaded):
`sparsify(model, 0.9, "erk")` masks every weight matrix it has (embeddings
aside, which stay dense by default), a short RigL fit keeps exact per-weight
counts and rewires every masked weight that is not dense, and `.keras`
save/load and `strip_masks` give identical predictions.
"""

import keras
import numpy as np
import pytest

import rigl_keras as rk

BACKEND = keras.backend.backend()
# The big convolutional networks take a while to trace; on JAX and PyTorch
# one of them stands for the rest (they share every layer kind).
HEAVY_ELSEWHERE = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="traced once per backend; MobileNetV2 covers these kinds"
)


def _classifier(backbone, inputs, features):
    outputs = keras.layers.Dense(3, name="head")(features(backbone(inputs)))
    return keras.Model(inputs, outputs)


def application(name, shape):
    def build():
        model = getattr(keras.applications, name)(weights=None, input_shape=shape, classes=3)
        x = np.random.default_rng(0).random((4,) + shape, dtype="float32")
        return model, x

    return build


def lstm_model():
    inputs = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(20, 8, name="embed")(inputs)
    x = keras.layers.LSTM(12, return_sequences=True, name="lstm")(x)
    x = keras.layers.TimeDistributed(keras.layers.Dense(6), name="td")(x)
    x = keras.layers.LSTM(8, name="lstm2")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    x_data = np.random.default_rng(0).integers(0, 20, (4, 6)).astype("int32")
    return keras.Model(inputs, outputs), x_data


def gru_model():
    inputs = keras.Input((6, 5))
    x = keras.layers.Bidirectional(keras.layers.GRU(8, return_sequences=True), name="bigru")(inputs)
    x = keras.layers.SimpleRNN(6, name="rnn")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs), np.random.default_rng(0).random((4, 6, 5), dtype="float32")


def hub_backbone(name):
    def build():
        keras_hub = pytest.importorskip("keras_hub")
        config = dict(vocabulary_size=40, num_layers=2, num_heads=2, hidden_dim=8,
                      intermediate_dim=16, max_sequence_length=8)
        backbone = getattr(keras_hub.models, name)(**config)
        rng = np.random.default_rng(0)
        x = {"token_ids": rng.integers(0, 40, (4, 8)).astype("int32"),
             "padding_mask": np.ones((4, 8), "int32")}
        if name == "BertBackbone":
            x["segment_ids"] = np.zeros((4, 8), "int32")
        return backbone, x

    return build


MODELS = {
    "ResNet50": pytest.param(application("ResNet50", (32, 32, 3)), marks=HEAVY_ELSEWHERE),
    "MobileNetV2": application("MobileNetV2", (32, 32, 3)),
    "EfficientNetB0": pytest.param(application("EfficientNetB0", (32, 32, 3)), marks=HEAVY_ELSEWHERE),
    "Xception": pytest.param(application("Xception", (71, 71, 3)), marks=HEAVY_ELSEWHERE),
    "BertBackbone": hub_backbone("BertBackbone"),
    "GPT2Backbone": hub_backbone("GPT2Backbone"),
    "LSTM": lstm_model,
    "GRU": gru_model,
}


def _trainable(sparse, x):
    """A model to fit: backbones with dict outputs get a classifier head."""
    if not isinstance(x, dict):
        return sparse
    inputs = {k: keras.Input(v.shape[1:], dtype="int32", name=k) for k, v in x.items()}
    def features(out):  # every output in use, so every weight gets a gradient
        if not isinstance(out, dict):  # GPT-2: the sequence output alone
            return keras.ops.mean(out, axis=1)
        parts = [keras.ops.mean(out["sequence_output"], axis=1)]
        if "pooled_output" in out:
            parts.append(out["pooled_output"])
        return keras.ops.concatenate(parts, axis=-1)

    return _classifier(sparse, inputs, features)


def _predict(model, x):
    y = model.predict(x, verbose=0, batch_size=4)
    return {k: np.asarray(v) for k, v in y.items()} if isinstance(y, dict) else np.asarray(y)


def _assert_same(a, b):
    if isinstance(a, dict):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build", MODELS.values(), ids=MODELS.keys())
def test_real_model_end_to_end(build, tmp_path):
    dense, x = build()
    sparsities = rk.sparsity_distribution(dense, 0.9, "erk")
    sparse = rk.sparsify(dense, 0.9, "erk")

    # Every weight matrix is masked; embeddings stay dense by default.
    report = rk.sparsity_report(sparse)
    assert not [r.name for r in report if r.note.startswith("cannot")]
    assert all(r.note in ("", "embedding: dense by default") for r in report)
    weights = rk.masked_weights(sparse)
    assert {w.name for w in weights} == set(sparsities)
    counts = {w.name: rk.active_count(w.size, sparsities[w.name]) for w in weights}
    assert {r.name: r.active for r in report if not r.note} == counts

    # Save/load and strip give identical predictions.
    expected = _predict(sparse, x)
    path = str(tmp_path / "sparse.keras")
    sparse.save(path)
    _assert_same(expected, _predict(keras.models.load_model(path), x))
    _assert_same(expected, _predict(rk.strip_masks(sparse), x))

    # A short RigL fit: exact counts, every sparse weight rewired.
    model = _trainable(sparse, x)
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = {w.name: keras.ops.convert_to_numpy(w.mask).copy() for w in rk.masked_weights(model)}
    rigl = rk.RigLCallback(delta_t=1, alpha=0.5, decay="constant", end_step=100)
    model.fit(x, np.array([0, 1, 2, 0]), batch_size=4, epochs=2, verbose=0, callbacks=[rigl])
    rk.check_sparsity(model)
    for w in rk.masked_weights(model):
        mask = keras.ops.convert_to_numpy(w.mask)
        old = before[w.name]
        assert mask.sum() == old.sum(), w.name
        if 4 <= old.sum() < old.size:
            assert (mask != old).any(), f"{w.name} was never rewired"
