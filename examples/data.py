"""Datasets for the examples: Fashion-MNIST (offline-first), CIFAR-10, ImageNet-2012.

Fashion-MNIST is looked for, in order, in

1. `data_dir`, if given: a directory holding the four idx files
   (``train-images-idx3-ubyte[.gz]`` and friends);
2. the TensorFlow Datasets data directory, only if ``fashion_mnist`` is
   already prepared there (``download=False``: nothing is fetched);
3. ``/usr/share/datasets/fashion-mnist/``, where Debian's
   ``dataset-fashion-mnist`` package puts the idx files.

If none has it, `DatasetNotFoundError` says how to get it. The idx files are
parsed with numpy (`read_idx`), so no network access is ever needed.

CIFAR-10 and ImageNet-2012 come from TFDS (`tfds.load`) as `tf.data`
pipelines with the usual augmentation (random crops and flips). Their code
paths are tested offline with `tfds.testing.mock_data`.
"""

from __future__ import annotations

import dataclasses
import gzip
import os

import numpy as np

__all__ = [
    "FASHION_MNIST_DEBIAN_DIR",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_CLASSES",
    "DatasetNotFoundError",
    "ArrayData",
    "read_idx",
    "load_fashion_mnist_idx",
    "load_fashion_mnist",
    "cifar10_datasets",
    "imagenet_datasets",
    "IMAGENET_TRAIN_EXAMPLES",
]

#: Where Debian's `dataset-fashion-mnist` package installs the idx files.
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

#: split -> (images file, labels file), names without the optional ".gz".
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

#: Images in the ImageNet-2012 training split.
IMAGENET_TRAIN_EXAMPLES = 1281167

# idx type codes (third byte of the magic number) -> numpy dtype, big-endian.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not available locally (and will not be downloaded)."""


@dataclasses.dataclass(frozen=True)
class ArrayData:
    """An in-memory train/test split of an image classification dataset.

    Attributes:
      x_train, y_train, x_test, y_test: images (float32 in [0, 1], shape
        (N, 28, 28) for Fashion-MNIST) and int32 labels.
      source: where the data came from, e.g. "idx:/usr/share/...", "tfds".
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str

    def __iter__(self):
        # Unpacks like keras.datasets: (x_train, y_train), (x_test, y_test) = data.
        return iter(((self.x_train, self.y_train), (self.x_test, self.y_test)))

    def flatten(self) -> "ArrayData":
        """The same data with each image flattened to a vector (N, 784)."""
        return ArrayData(
            self.x_train.reshape(len(self.x_train), -1), self.y_train,
            self.x_test.reshape(len(self.x_test), -1), self.y_test, self.source,
        )

    def limit(self, train: int | None = None, test: int | None = None) -> "ArrayData":
        """The first `train` / `test` rows (None or 0: all of them)."""
        def cut(array, n):
            return array[:n] if n else array

        return ArrayData(
            cut(self.x_train, train), cut(self.y_train, train),
            cut(self.x_test, test), cut(self.y_test, test), self.source,
        )


# ---------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an idx file (as used by MNIST), gzipped or not, into a numpy array.

    Format: two zero bytes, a type code byte, the number of dimensions n, then
    n big-endian uint32 sizes, then the data in big-endian row-major order.

    Args:
      path: the file; a ".gz" suffix (or gzip magic bytes) means gzipped.

    Returns:
      An array of the file's shape, in native byte order.

    Raises:
      ValueError: if the file is not a well-formed idx file.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic number).")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown idx type code 0x{code:02x}.")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header.")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: idx header says shape {shape} ({expected} bytes of data) "
            f"but the file holds {len(raw) - header}."
        )
    array = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _find_idx(directory: str, name: str) -> str | None:
    for candidate in (name + ".gz", name):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def _missing_message(looked_in: list[str]) -> str:
    places = "\n".join(f"  - {place}" for place in looked_in)
    return (
        "Fashion-MNIST was not found. Looked in:\n"
        f"{places}\n"
        "Get it in one of two ways:\n"
        "  1. sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu; installs "
        f"the idx files into {FASHION_MNIST_DEBIAN_DIR}/), or\n"
        "  2. pass --data_dir=DIR, a directory holding train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
        "t10k-labels-idx1-ubyte.gz (gzipped or not).\n"
        "(A TFDS copy is used too if `fashion_mnist` is already prepared in the "
        "TFDS data directory; it is never downloaded from here.)"
    )


def load_fashion_mnist_idx(directory: str | os.PathLike) -> ArrayData:
    """Fashion-MNIST from the four idx files in `directory`.

    Returns:
      `ArrayData` with float32 images in [0, 1] of shape (N, 28, 28) and
      int32 labels.

    Raises:
      DatasetNotFoundError: if a file is missing.
      ValueError: if a file is malformed or images and labels disagree.
    """
    directory = os.fspath(directory)
    arrays = {}
    for split, names in FASHION_MNIST_FILES.items():
        for kind, name in zip(("x", "y"), names):
            path = _find_idx(directory, name)
            if path is None:
                raise DatasetNotFoundError(
                    f"{name}[.gz] is missing from {directory}.\n" + _missing_message([directory])
                )
            arrays[kind, split] = read_idx(path)
    for split in FASHION_MNIST_FILES:
        x, y = arrays["x", split], arrays["y", split]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"{directory}: {split} images {x.shape} and labels {y.shape} do not match."
            )
    return ArrayData(
        _normalize(arrays["x", "train"]), arrays["y", "train"].astype("int32"),
        _normalize(arrays["x", "test"]), arrays["y", "test"].astype("int32"),
        source=f"idx:{directory}",
    )


def _normalize(images: np.ndarray) -> np.ndarray:
    # uint8 pixels -> float32 in [0, 1], the usual MNIST input scaling.
    return images.astype("float32") / 255.0


def _load_fashion_mnist_tfds(tfds_data_dir: str | None) -> ArrayData | None:
    """Fashion-MNIST from TFDS if it is already prepared; None otherwise."""
    # Look before importing TFDS: without a fashion_mnist folder there is
    # nothing to load, and TFDS would only log warnings about it.
    candidates = [tfds_data_dir] if tfds_data_dir else [
        os.environ.get("TFDS_DATA_DIR"), os.path.expanduser("~/tensorflow_datasets")
    ]
    if not any(d and os.path.isdir(os.path.join(d, "fashion_mnist")) for d in candidates):
        return None
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        return None
    try:
        builder = tfds.builder("fashion_mnist", data_dir=tfds_data_dir)
        if not builder.is_prepared():
            return None
        splits = tfds.as_numpy(
            builder.as_dataset(split=["train", "test"], batch_size=-1, as_supervised=True)
        )
    except Exception:  # a broken or partial TFDS copy: fall back to idx files
        return None
    (x_train, y_train), (x_test, y_test) = splits
    return ArrayData(
        _normalize(x_train[..., 0]), y_train.astype("int32"),
        _normalize(x_test[..., 0]), y_test.astype("int32"),
        source="tfds:" + builder.data_dir,
    )


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    use_tfds: bool = True,
    tfds_data_dir: str | None = None,
    debian_dir: str | os.PathLike | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    flatten: bool = False,
) -> ArrayData:
    """Fashion-MNIST (60k train, 10k test) without touching the network.

    The result unpacks like `keras.datasets`:
    ``(x_train, y_train), (x_test, y_test) = load_fashion_mnist()``.

    Args:
      data_dir: a directory with the four idx files; if given, only it is used.
      use_tfds: also look for a prepared TFDS copy (never downloads).
      tfds_data_dir: the TFDS data directory (None: TFDS's default).
      debian_dir: where to look for the Debian package's files (None:
        `FASHION_MNIST_DEBIAN_DIR`).
      train_limit, test_limit: keep only the first rows (None or 0: all).
      flatten: return images as vectors of 784 pixels (for an MLP whose
        input is `keras.Input((784,))`).

    Returns:
      `ArrayData`: float32 images in [0, 1] of shape (N, 28, 28) (or
      (N, 784) with `flatten`), int32 labels.

    Raises:
      DatasetNotFoundError: if the data is in none of the places, with a
        message naming both ways to get it.
    """
    if data_dir:
        if not os.path.isdir(data_dir):
            raise DatasetNotFoundError(
                f"--data_dir {data_dir} is not a directory.\n"
                + _missing_message([os.fspath(data_dir)])
            )
        data = load_fashion_mnist_idx(data_dir)
    else:
        data = _load_fashion_mnist_tfds(tfds_data_dir) if use_tfds else None
        if data is None:
            debian = os.fspath(debian_dir or FASHION_MNIST_DEBIAN_DIR)
            if not all(
                _find_idx(debian, name)
                for names in FASHION_MNIST_FILES.values() for name in names
            ):
                looked_in = [debian]
                if use_tfds:
                    looked_in.insert(0, "the TFDS data directory (fashion_mnist not prepared)")
                raise DatasetNotFoundError(_missing_message(looked_in))
            data = load_fashion_mnist_idx(debian)
    data = data.limit(train_limit, test_limit)
    return data.flatten() if flatten else data


# ---------------------------------------------------------------------------
# TFDS image pipelines
# ---------------------------------------------------------------------------

_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _tfds_load(name, split, *, data_dir, download, seed=None, shuffle_files=False):
    import tensorflow_datasets as tfds

    read_config = tfds.ReadConfig(shuffle_seed=seed) if shuffle_files else None
    try:
        return tfds.load(
            name, split=split, as_supervised=True, data_dir=data_dir,
            download=download, shuffle_files=shuffle_files, read_config=read_config,
        )
    except AssertionError as error:  # TFDS's "could not find data" when download=False
        raise DatasetNotFoundError(
            f"TFDS dataset {name!r} is not prepared in "
            f"{data_dir or 'the default TFDS data directory'} ({error}). Prepare it "
            "with network access (tfds.builder(name).download_and_prepare()), or "
            "pass its directory with --tfds_data_dir."
        ) from error


def _normalize_image(image, mean, std):
    import tensorflow as tf

    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(mean)) / tf.constant(std)


def cifar10_datasets(
    batch_size: int,
    *,
    data_dir: str | None = None,
    download: bool = True,
    image_size: int = 32,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
):
    """CIFAR-10 train and test `tf.data` pipelines from TFDS.

    Training images are padded by 1/8 of their size (4 pixels at 32×32),
    randomly cropped back and randomly flipped left-right; all images are
    normalized with the per-channel CIFAR-10 mean and std. The train set is
    shuffled and repeated forever with fixed-size batches; the test set is
    batched once.

    Args:
      batch_size: global batch size.
      data_dir: the TFDS data directory (None: TFDS's default).
      download: let TFDS download CIFAR-10 if it is not prepared.
      image_size: side of the (square) model input; images are resized to it
        if it is not 32 (tests use tiny images).
      train_limit, test_limit: keep only the first examples (None or 0: all).
      seed: seed of the shuffling and the augmentation.

    Returns:
      (train_dataset, test_dataset) of (image float32 [size, size, 3], label int32).
    """
    import tensorflow as tf

    train = _tfds_load("cifar10", "train", data_dir=data_dir, download=download,
                       seed=seed, shuffle_files=True)
    test = _tfds_load("cifar10", "test", data_dir=data_dir, download=download)
    if train_limit:
        train = train.take(train_limit)
    if test_limit:
        test = test.take(test_limit)
    pad = max(1, image_size // 8)

    def resize(image):
        if image_size != 32:
            image = tf.image.resize(image, (image_size, image_size))
        return image

    def augment(image, label):
        image = resize(tf.cast(image, tf.float32))
        image = tf.image.resize_with_crop_or_pad(image, image_size + 2 * pad, image_size + 2 * pad)
        image = tf.image.random_crop(image, (image_size, image_size, 3), seed=seed)
        image = tf.image.random_flip_left_right(image, seed=seed)
        return _normalize_image(image, _CIFAR_MEAN, _CIFAR_STD), tf.cast(label, tf.int32)

    def evaluate(image, label):
        image = resize(tf.cast(image, tf.float32))
        return _normalize_image(image, _CIFAR_MEAN, _CIFAR_STD), tf.cast(label, tf.int32)

    autotune = tf.data.AUTOTUNE
    train = (
        train.shuffle(10000, seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .map(augment, num_parallel_calls=autotune)
        .batch(batch_size, drop_remainder=True)
        .prefetch(autotune)
    )
    test = test.map(evaluate, num_parallel_calls=autotune).batch(batch_size).prefetch(autotune)
    return train, test


def _random_resized_crop(image, image_size, seed):
    """Inception-style crop: 8%–100% of the area, aspect ratio 3/4–4/3."""
    import tensorflow as tf

    shape = tf.shape(image)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, (1, 1, 4)),
        min_object_covered=0.1,
        aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
        seed=seed,
    )
    image = tf.slice(image, begin, size)
    return tf.image.resize(image, (image_size, image_size))


def _center_crop(image, image_size):
    """The central image_size/(image_size + 32) of the shorter side, resized."""
    import tensorflow as tf

    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    fraction = image_size / (image_size + 32)
    side = tf.cast(tf.cast(tf.minimum(height, width), tf.float32) * fraction, tf.int32)
    top, left = (height - side) // 2, (width - side) // 2
    image = tf.image.crop_to_bounding_box(image, top, left, side, side)
    return tf.image.resize(image, (image_size, image_size))


def imagenet_datasets(
    batch_size: int,
    *,
    data_dir: str | None = None,
    download: bool = False,
    image_size: int = 224,
    num_classes: int = 1000,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
):
    """ImageNet-2012 train and validation `tf.data` pipelines from TFDS.

    Training: a random crop of 8–100% of the area with aspect ratio in
    [3/4, 4/3], resized to `image_size`, and a random left-right flip.
    Evaluation: a central crop (224/256 of the shorter side at 224) resized
    to `image_size`. Images are normalized with the ImageNet mean and std;
    labels are one-hot (for label smoothing).

    TFDS cannot download ImageNet: put the tar files in TFDS's manual
    directory and prepare it once (see the TFDS `imagenet2012` page).

    Args:
      batch_size: global batch size.
      data_dir: the TFDS data directory (None: TFDS's default).
      download: let TFDS prepare the dataset from the manual directory.
      image_size: side of the square model input (224 in the paper).
      num_classes: classes of the one-hot labels.
      train_limit, test_limit: keep only the first examples (None or 0: all).
      seed: seed of the shuffling and the augmentation.

    Returns:
      (train_dataset, validation_dataset) of
      (image float32 [size, size, 3], one-hot label float32 [num_classes]).
    """
    import tensorflow as tf

    train = _tfds_load("imagenet2012", "train", data_dir=data_dir, download=download,
                       seed=seed, shuffle_files=True)
    test = _tfds_load("imagenet2012", "validation", data_dir=data_dir, download=download)
    if train_limit:
        train = train.take(train_limit)
    if test_limit:
        test = test.take(test_limit)

    def one_hot(label):
        return tf.one_hot(tf.cast(label, tf.int32), num_classes)

    def augment(image, label):
        image = _random_resized_crop(image, image_size, seed)
        image = tf.image.random_flip_left_right(image, seed=seed)
        return _normalize_image(image, _IMAGENET_MEAN, _IMAGENET_STD), one_hot(label)

    def evaluate(image, label):
        image = _center_crop(image, image_size)
        return _normalize_image(image, _IMAGENET_MEAN, _IMAGENET_STD), one_hot(label)

    autotune = tf.data.AUTOTUNE
    train = (
        train.shuffle(10 * batch_size, seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .map(augment, num_parallel_calls=autotune)
        .batch(batch_size, drop_remainder=True)
        .prefetch(autotune)
    )
    test = test.map(evaluate, num_parallel_calls=autotune).batch(batch_size).prefetch(autotune)
    return train, test
