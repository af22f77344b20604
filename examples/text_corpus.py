"""Real text with no download: the running Python's standard library, as bytes.

Both the stability study (``stability.py``) and the main job (``train_lm.py``)
train byte-level language models on it. The corpus is a fixed, sorted list of
the standard library's ``.py`` files (its test suites and ``site-packages``
left out); every tenth file, in that order, is held out, so the held-out text
comes from files the model never saw. Any other corpus: a text file, or a
folder whose files are read in sorted order, split the same way.

The file count, byte count and SHA-256 of the bytes identify the corpus a run
used (they differ between Python versions).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from collections.abc import Sequence

import numpy as np

VOCAB_SIZE = 256  # byte-level tokens
HELDOUT_EVERY = 10  # every 10th file (sorted order) is held out
_SKIPPED_DIRS = frozenset({"site-packages", "__pycache__", "test", "tests", "idle_test"})


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token streams (``uint8``) split by file, and what identifies them."""

    source: str
    train: np.ndarray
    heldout: np.ndarray
    num_files: int
    num_train_files: int
    num_heldout_files: int
    num_bytes: int
    sha256: str

    def describe(self) -> dict[str, object]:
        """The corpus's identity, for ``results.json`` and the summaries."""
        return {
            "source": self.source,
            "num_files": self.num_files,
            "num_train_files": self.num_train_files,
            "num_heldout_files": self.num_heldout_files,
            "num_bytes": self.num_bytes,
            "train_bytes": int(self.train.size),
            "heldout_bytes": int(self.heldout.size),
            "sha256": self.sha256,
        }


def stdlib_files() -> list[str]:
    """The standard library's ``.py`` files in sorted order, test suites left out."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]
        found += [
            os.path.join(folder, f)
            for f in files
            if f.endswith(".py") and not f.startswith("test_")
        ]
    return sorted(found, key=lambda p: os.path.relpath(p, root))


def _files_of(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = []
        for folder, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [os.path.join(folder, n) for n in names if not n.startswith(".")]
        return sorted(files, key=lambda p: os.path.relpath(p, path))
    raise SystemExit(f"--corpus {path!r}: not a file or a folder")


def _split_file(data: bytes) -> tuple[bytes, bytes]:
    # One file alone: its last tenth is held out (a split by position).
    cut = len(data) - max(1, len(data) // HELDOUT_EVERY)
    return data[:cut], data[cut:]


def load_corpus(path: str | None = None, *, min_bytes: int = 4096) -> Corpus:
    """The stdlib corpus (``path=None``), or the text at ``path`` (a file or a folder).

    Raises:
      SystemExit: ``path`` does not exist, or the corpus is too small to train on.
    """
    files = stdlib_files() if path is None else _files_of(path)
    source = "python-stdlib " + sysconfig.get_python_version() if path is None else path
    digest = hashlib.sha256()
    train_parts: list[bytes] = []
    heldout_parts: list[bytes] = []
    for i, name in enumerate(files):
        with open(name, "rb") as f:
            data = f.read()
        digest.update(data)
        if len(files) == 1:
            train_part, heldout_part = _split_file(data)
            train_parts.append(train_part)
            heldout_parts.append(heldout_part)
        elif i % HELDOUT_EVERY == 0:
            heldout_parts.append(data)
        else:
            train_parts.append(data)
    train = np.frombuffer(b"".join(train_parts), np.uint8)
    heldout = np.frombuffer(b"".join(heldout_parts), np.uint8)
    if train.size < min_bytes or heldout.size < min_bytes // 8:
        raise SystemExit(
            f"corpus {source!r} is too small: {train.size} training and {heldout.size} held-out "
            f"bytes; need at least {min_bytes} and {min_bytes // 8}"
        )
    num_heldout = 1 if len(files) == 1 else len(range(0, len(files), HELDOUT_EVERY))
    return Corpus(
        source=source,
        train=train,
        heldout=heldout,
        num_files=len(files),
        num_train_files=len(files) - num_heldout if len(files) > 1 else 1,
        num_heldout_files=num_heldout,
        num_bytes=int(train.size + heldout.size),
        sha256=digest.hexdigest(),
    )


def window_starts(
    stream: np.ndarray, num: int, length: int, rng: np.random.Generator
) -> np.ndarray:
    """``num`` random start positions of windows of ``length`` tokens in ``stream``."""
    return rng.integers(0, stream.size - length, size=num)


def windows(stream: np.ndarray, starts: Sequence[int] | np.ndarray, length: int) -> np.ndarray:
    """The windows of ``length`` tokens at ``starts``, as ``int32`` ``[len(starts), length]``."""
    index = np.asarray(starts)[:, None] + np.arange(length)[None, :]
    return stream[index].astype(np.int32)
