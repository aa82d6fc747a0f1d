"""Atomic output: a file is either written whole or not at all.

Writers produce the file at a temporary path beside the destination and rename it into
place only after the content is complete, so an error (or Ctrl-C) never leaves a partial
output file behind.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import UserError


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, before any expensive work, if `path` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"output path {path} is a directory")
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {path}: directory {parent} is not writable")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path; on success rename it to `path`, on failure delete it."""
    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike, what: str):
    """Parse a JSON file the user named; `what` names it in the one-line error."""
    import json

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} is not JSON: {exc}") from None
