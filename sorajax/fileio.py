"""Atomic file writes: every output is written to a temporary sibling and renamed into place,
so a crash, a kill or a full disk never leaves a half-written file under the final name."""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

import numpy as np

from sorajax.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary sibling of `path` (same extension, so writers that pick a format from
    the name still do); on success it is renamed to `path`, on any failure removed. OSError
    (unwritable place, full disk) becomes one UserError line."""
    d, base = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(base)
    tmp = os.path.join(d, f".{stem}.tmp{os.getpid()}{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path!r}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path: str, obj: Any, indent: int = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent))


def write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def save_npy(path: str, arr) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, np.asarray(arr))
