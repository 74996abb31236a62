"""Character-level text corpora for the language-modelling example (`char_lm.py`).

`load_char_corpus` returns ``(train_ids, valid_ids, test_ids, vocab)``: int32
arrays of character ids and the vocabulary (a list of characters; id i is
``vocab[i]``). The text is split by position, deterministically: the first
90% of the characters train, the next 5% validate, the last 5% test.

Sources:

* ``"kjv"`` (offline): the King James Version of the Bible, from Debian's
  `bible-kjv` package (``apt-get install bible-kjv``; it pulls in
  `bible-kjv-text`, whose ``/usr/lib/bible.data`` holds the text in a
  compressed random-access format). The package's ``bible`` program decodes
  it (about 0.1 s); we keep the verse text, one verse per line, without the
  verse references: 31,102 lines, 4,137,849 characters, 63 distinct
  characters (letters, digits, punctuation, space, newline). Public domain
  text; the program is GPL-2+.
* ``"file"``: a UTF-8 text file; `data_dir` is its path (e.g. one written by
  `make_text_slice`, or any corpus you prepared yourself).
* ``"tfds:NAME"``: the ``text`` feature of a TensorFlow Datasets dataset
  already prepared in `data_dir` (``download=False``: nothing is fetched),
  documents joined by blank lines, read until `max_chars`. **WikiText-103,
  the paper's dataset, is not in the TFDS catalog** (TFDS 4.9 has
  ``wikipedia``, ``wiki40b``, ``lm1b``, ``pg19``, ``tiny_shakespeare``, but
  no ``wikitext``). Its closest real relative there is English Wikipedia,
  ``"tfds:wikipedia/20230601.en"`` (WikiText-103 is drawn from Wikipedia's
  Good and Featured articles); use `max_chars` with it (WikiText-103 has
  about 540M characters; the full Wikipedia dump is ~20 GB of text).
  ``"wikitext103"`` is accepted only to say this.
* ``"auto"``: ``"kjv"`` when the Debian package is installed, else
  `DatasetNotFoundError` with the apt command.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np

__all__ = [
    "KJV_DEBIAN_PACKAGE",
    "KJV_DATA_FILE",
    "KJV_PROGRAM",
    "SOURCES",
    "SPLIT_FRACTIONS",
    "DatasetNotFoundError",
    "kjv_available",
    "load_text",
    "split_text",
    "encode",
    "decode",
    "load_char_corpus",
    "make_text_slice",
]

#: The Debian package to install (`apt-get install bible-kjv`): the `bible`
#: program; it depends on `bible-kjv-text`, which holds the text itself.
KJV_DEBIAN_PACKAGE = "bible-kjv"

#: Where `bible-kjv-text` installs the compressed text.
KJV_DATA_FILE = "/usr/lib/bible.data"

#: The decoder program `bible-kjv` installs.
KJV_PROGRAM = "bible"

#: Every verse, first to last, as `bible` understands references.
_KJV_RANGE = "gen1:1-rev22:21"

#: The `source` values `load_char_corpus` accepts besides "tfds:NAME".
SOURCES = ("auto", "kjv", "file", "wikitext103")

#: (train, valid, test) fractions of the text, in this order by position.
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)

#: The TFDS dataset closest to WikiText-103.
_CLOSEST_TFDS = "wikipedia/20230601.en"

try:  # one error class for all the examples' missing data
    from examples.data import DatasetNotFoundError
except ImportError:  # pragma: no cover - examples/data.py absent or broken

    class DatasetNotFoundError(FileNotFoundError):
        """A dataset is not available locally (and will not be downloaded)."""


def _kjv_paths(data_dir: str | None) -> tuple[str | None, str]:
    data_file = os.path.join(data_dir, os.path.basename(KJV_DATA_FILE)) if data_dir \
        else KJV_DATA_FILE
    return shutil.which(KJV_PROGRAM), data_file


def kjv_available(data_dir: str | None = None) -> bool:
    """True if the `bible` program and its data file are installed."""
    program, data_file = _kjv_paths(data_dir)
    return program is not None and os.path.isfile(data_file)


def _kjv_missing() -> DatasetNotFoundError:
    return DatasetNotFoundError(
        "No offline text corpus found: the King James Bible comes from Debian's "
        f"{KJV_DEBIAN_PACKAGE!r} package ({KJV_PROGRAM!r} program + {KJV_DATA_FILE}). "
        f"Install it with `apt-get install -y {KJV_DEBIAN_PACKAGE}` (or `make text-data`), "
        "or pass source='file' with data_dir=<a UTF-8 text file>."
    )


def _load_kjv(data_dir: str | None) -> str:
    program, data_file = _kjv_paths(data_dir)
    if program is None or not os.path.isfile(data_file):
        raise _kjv_missing()
    # -f turns pretty-printing off: one verse per line, "Ge1:1 In the beginning ...".
    # -p names the data directory, so the current directory is never searched.
    output = subprocess.run(
        [program, "-f", "-p", os.path.dirname(data_file), "-d",
         os.path.basename(data_file), _KJV_RANGE],
        check=True, capture_output=True, text=True, encoding="utf-8",
    ).stdout
    verses = [line.split(" ", 1)[1] if " " in line else "" for line in output.splitlines()]
    verses = [v.strip() for v in verses if v.strip()]
    if not verses:
        raise DatasetNotFoundError(f"{program} printed no verses from {data_file}.")
    return "\n".join(verses) + "\n"


def _load_tfds(name: str, data_dir: str | None, max_chars: int | None) -> str:
    import tensorflow_datasets as tfds

    try:
        dataset = tfds.load(name, split="train", data_dir=data_dir, download=False)
    except Exception as error:  # noqa: BLE001 - tfds raises several kinds
        raise DatasetNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {data_dir or 'the default TFDS dir'} "
            f"(nothing is downloaded here): {error}"
        ) from error
    pieces, total = [], 0
    for example in dataset.as_numpy_iterator():
        text = example["text"]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        pieces.append(text)
        total += len(text) + 2
        if max_chars and total >= max_chars:
            break
    return "\n\n".join(pieces)


def load_text(source: str = "auto", data_dir: str | None = None,
              max_chars: int | None = None) -> str:
    """The raw text of a corpus (see the module docstring for `source`).

    Args:
      source: "auto", "kjv", "file", "tfds:NAME" (or "wikitext103", which
        raises with an explanation).
      data_dir: kjv: the directory holding bible.data (default /usr/lib);
        file: the text file's path; tfds: the TFDS data directory.
      max_chars: keep only the first `max_chars` characters (None or 0: all).

    Raises:
      DatasetNotFoundError: the corpus is not installed or prepared.
      ValueError: an unknown source.
    """
    if source == "auto":
        if not kjv_available(data_dir):
            raise _kjv_missing()
        source = "kjv"
    if source == "kjv":
        text = _load_kjv(data_dir)
    elif source == "file":
        if not data_dir or not os.path.isfile(data_dir):
            raise DatasetNotFoundError(
                f"source='file' needs data_dir=<path of a UTF-8 text file>; got {data_dir!r}."
            )
        with open(data_dir, encoding="utf-8") as f:
            text = f.read(max_chars) if max_chars else f.read()
    elif source.startswith("tfds:"):
        text = _load_tfds(source[len("tfds:"):], data_dir, max_chars)
    elif source == "wikitext103":
        raise ValueError(
            "WikiText-103 is not in the TensorFlow Datasets catalog, and nothing can be "
            "downloaded here. Use source='kjv' (offline, Debian), source='file' with a "
            f"copy you prepared, or source='tfds:{_CLOSEST_TFDS}' (English Wikipedia, the "
            "closest TFDS dataset) if it is prepared in data_dir."
        )
    else:
        raise ValueError(f"Unknown source {source!r}; choose one of {SOURCES} or 'tfds:NAME'.")
    if max_chars:
        text = text[: int(max_chars)]
    if not text:
        raise ValueError(f"Corpus {source!r} is empty.")
    return text


def split_text(text: str, fractions=SPLIT_FRACTIONS) -> tuple[str, str, str]:
    """(train, valid, test) pieces of `text` by position, in that order."""
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"`fractions` must be three positive numbers adding to 1; got {fractions}.")
    n = len(text)
    if n < 3:
        raise ValueError(f"Need at least 3 characters to split; got {n}.")
    a = min(max(1, int(round(fractions[0] * n))), n - 2)
    b = min(max(a + 1, int(round((fractions[0] + fractions[1]) * n))), n - 1)
    return text[:a], text[a:b], text[b:]


def encode(text: str, vocab) -> np.ndarray:
    """Character ids of `text` (int32) under `vocab`; every character must be in it."""
    index = {ch: i for i, ch in enumerate(vocab)}
    try:
        return np.fromiter((index[ch] for ch in text), dtype=np.int32, count=len(text))
    except KeyError as error:
        raise ValueError(f"Character {error.args[0]!r} is not in the vocabulary.") from None


def decode(ids, vocab) -> str:
    """The text of character ids under `vocab`."""
    return "".join(vocab[int(i)] for i in np.asarray(ids).ravel())


def load_char_corpus(source: str = "auto", data_dir: str | None = None,
                     max_chars: int | None = None):
    """A character corpus as ids, split 90/5/5 by position.

    Args:
      source: see `load_text`.
      data_dir: see `load_text`.
      max_chars: use only the first `max_chars` characters of the text
        (before splitting); None or 0 uses all.

    Returns:
      (train_ids, valid_ids, test_ids, vocab): three int32 arrays and the
      sorted list of the distinct characters of the (possibly cut) text.
    """
    text = load_text(source, data_dir, max_chars)
    vocab = sorted(set(text))
    train, valid, test = split_text(text)
    return encode(train, vocab), encode(valid, vocab), encode(test, vocab), vocab


def make_text_slice(n_chars: int, path: str | os.PathLike, source: str = "auto",
                    data_dir: str | None = None) -> str:
    """Writes the first `n_chars` characters of a corpus to `path` (for tests).

    Load it back with ``load_char_corpus("file", data_dir=path)``.

    Returns:
      The path, as a string.
    """
    text = load_text(source, data_dir, max_chars=int(n_chars))
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
