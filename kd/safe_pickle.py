"""Unpickling that builds data and never runs code: the one way kd reads a pickle it did not write.

A pickle names callables (`os.system`, `open`, ...) that the unpickler looks up and calls, so a
plain `pickle.load` of a downloaded or inherited file runs whatever the file asks for. The formats
kd reads (CIFAR's python batches) hold only containers, strings, numbers and numpy arrays; every
callable the unpickler is asked for must be one that builds those, else the file is refused before
anything is called.
"""

from __future__ import annotations

import _compat_pickle
import pickle
from pathlib import Path
from typing import Any

from kd.errors import SpecError

NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1 and numpy 2 spellings
ALLOWED = frozenset(
    # what protocols 0-2 reduce these builtins to (dict, list, tuple, str, numbers have opcodes; protocol 2
    # writes an empty bytes as a call of bytes)
    {("builtins", name) for name in ("set", "frozenset", "bytes", "bytearray", "complex")}
    | {("_codecs", "encode")}  # bytes written by protocol 2 with Python 3: encode(text, 'latin1')
    | {("numpy", "ndarray"), ("numpy", "dtype")}
    | {(module, name) for module in NUMPY_CORE for name in ("_reconstruct", "scalar")}
    | {(module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")}  # protocol 5 arrays
)


class UnsafePickle(SpecError):
    """A pickle asked for a callable outside ALLOWED: refused before it could run."""


class _DataOnly(pickle.Unpickler):
    def __init__(self, file: Any, path: Path, encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (__builtin__.set, copy_reg...) checked by their Python 3 names, as loaded
        py3 = _compat_pickle.NAME_MAPPING.get((module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        if py3 not in ALLOWED:
            raise UnsafePickle(
                f"{self.path} asks to call {module}.{name} while unpickling: refused, only plain data and numpy "
                "arrays are read; delete the file and get a trusted copy"
            )
        return super().find_class(module, name)


def load(path: Path, encoding: str = "ASCII") -> Any:
    """The data in the pickle at `path`; UnsafePickle (one line naming the file and the callable) if
    it asks for anything else. `encoding` as for pickle.load ('bytes' for Python 2 str)."""
    with path.open("rb") as f:
        return _DataOnly(f, path, encoding).load()
