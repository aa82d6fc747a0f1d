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

from .errors import UserError, first_line


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


def check_distinct_outputs(outputs: dict[str, str | os.PathLike], inputs: dict[str, object]) -> None:
    """Fail early if two outputs are one file, or an output is one of the inputs: writing it
    would replace the checkpoint (or the other output) the user still has. `outputs`: flag
    -> path (None entries skipped); `inputs`: flag -> the values given for it (a path, a list
    of paths, anything else: only values naming an existing file count)."""
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved in seen:
            raise UserError(f"{flag} {path} is also {seen[resolved]}'s path; give each output its own name")
        seen[resolved] = flag
    for flag, value in inputs.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(v, (str, os.PathLike)) or not str(v):
                continue
            try:  # any argument's text is looked at: JSON, a name too long for a path, a NUL byte
                if not Path(v).is_file():
                    continue
                resolved = Path(v).resolve()
            except (OSError, ValueError):
                continue
            if resolved in seen:
                raise UserError(f"{seen[resolved]} {v} is also an input ({flag}): writing it would replace that "
                                "file; give the output another name")


# Longest file name most file systems take (NAME_MAX); a temporary name adds ~15 characters.
_NAME_MAX = 255


def temporary_prefix(name: str) -> str:
    """The prefix of a temporary file or folder made beside `name` (mkstemp / mkdtemp add a
    random part and a suffix): hidden, recognisable, and short enough for NAME_MAX."""
    return f".{name[:_NAME_MAX - 40]}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path; on success rename it to `path`, on failure delete it.

    The result gets the mode a plain `open()` would give it (0666 less the umask), not
    mkstemp's private 0600. Any exception, KeyboardInterrupt and the CLI's SIGTERM
    (cli.Terminated) included, removes the temporary file. An OSError while writing (a full
    disk, a read-only file system, a name too long) is the one-line error naming `path`."""
    path = check_writable(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


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


def pickle_protocol(path: str | os.PathLike) -> int | None:
    """The pickle protocol of torch.save's data.pkl (zip format) or of a raw pickle stream,
    from its PROTO opcode; None if unreadable. torch's safe loader (weights_only) reads
    protocol 2 (torch.save's default) and fails on 4 and 5 as on a damaged file."""
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next(n for n in z.namelist() if n.endswith("data.pkl"))
                with z.open(name) as f:
                    head = f.read(2)
        else:
            with open(path, "rb") as f:
                head = f.read(2)
    except (OSError, StopIteration, zipfile.BadZipFile, ValueError):
        return None
    return head[1] if len(head) == 2 and head[0] == 0x80 else None


def read_array(path: str | os.PathLike, what: str, kinds=(".npy", ".npz", ".pt", ".pth")):
    """The one loader for arrays the user names (sample inputs, `run --input`, groupings):
    .npy, .npz (its only array, or the first) or a .pt/.pth tensor, as a numpy array.

    Nothing is unpickled unsafely: numpy with allow_pickle=False, torch with
    weights_only=True; there is no trust flag for data files (save plain arrays instead).
    Any failure on damaged bytes is one UserError naming `what` and the file; library
    warnings raised while reading are not passed on (they would make the error several
    lines). Complex, object and string arrays are refused by name: callers cast to their
    input's real dtype, which would drop the imaginary part silently."""
    import pickle
    import warnings

    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in kinds:
        raise UserError(f"{what} {path}: use a {', '.join(kinds[:-1])} or {kinds[-1]} file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if suffix == ".npy":
                data = np.load(path, allow_pickle=False)
            elif suffix == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    if not z.files:
                        raise UserError(f"{what} {path}: the .npz holds no array")
                    data = z[z.files[0]]
            else:
                import torch

                data = torch.load(str(path), map_location="cpu", weights_only=True)
                if not isinstance(data, torch.Tensor):
                    raise UserError(f"{what} {path} holds a {type(data).__name__}, not a tensor")
                data = data.numpy(force=True) if data.dtype != torch.bfloat16 else data.float().numpy()
    except UserError:
        raise
    except (pickle.UnpicklingError, ValueError) as exc:
        # numpy says "allow_pickle" both for object arrays and for any bytes that are not .npy
        # (it would try them as a pickle): only the first, or a pickle stream, "pickles objects"
        with open(path, "rb") as f:
            starts_as_pickle = f.read(1) == b"\x80"
        if not (isinstance(exc, pickle.UnpicklingError) or "Object arrays" in str(exc) or starts_as_pickle):
            first = first_line(exc)
            raise UserError(f"{what} {path} cannot be read (truncated or damaged?): {first[:200]}") from None
        protocol = pickle_protocol(path) if suffix in (".pt", ".pth") else None
        if protocol is not None and protocol > 2:
            raise UserError(f"{what} {path} was saved with pickle protocol {protocol}, which torch's safe loader "
                            "cannot read: save it with torch.save's default protocol, or as .npy") from None
        raise UserError(f"{what} {path} pickles Python objects, which data files are never allowed to "
                        "(loading them runs code): save a plain array (.npy) or tensor") from None
    except Exception as exc:  # noqa: BLE001 - numpy, zipfile and torch fail in many ways on damaged bytes
        first = first_line(exc)
        raise UserError(f"{what} {path} cannot be read (truncated or damaged?): {first[:200]}") from None
    if not isinstance(data, np.ndarray):
        raise UserError(f"{what} {path} does not hold an array")
    if np.iscomplexobj(data):
        raise UserError(f"{what} {path} holds complex values ({data.dtype}); gate2deploy will not drop "
                        "the imaginary part")
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_):
        raise UserError(f"{what} {path} holds {data.dtype} values, not numbers")
    return data


def cast_values(data, dtype, what: str):
    """`data` (from read_array) as `dtype`, the precision the model computes in. A conversion
    that changes values (float64 rounded to float32, integers beyond float32's 2^24, values
    out of range) is not silent: one `warning:` line on stderr says how far the largest value
    moved. NaN stays NaN and counts as unchanged."""
    import sys

    import warnings

    import numpy as np

    dtype = np.dtype(dtype)
    with warnings.catch_warnings():  # numpy's overflow warnings: the one line below says it
        warnings.simplefilter("ignore", RuntimeWarning)
        out = data.astype(dtype, copy=False)
        if out.dtype == data.dtype or data.size == 0:
            return out
        back = out.astype(np.float64)
        orig = data.astype(np.float64)
        moved = ~((back == orig) | (np.isnan(back) & np.isnan(orig)))
        change = np.abs(back[moved] - orig[moved]) / np.maximum(np.abs(orig[moved]), np.finfo(np.float64).tiny)
    if moved.any():
        largest = float(np.nanmax(change)) if np.isfinite(change).any() else float("inf")
        print(f"warning: {what}: {int(moved.sum())} of {data.size} {data.dtype} values change when "
              f"converted to the model's {dtype} (largest relative change {largest:.2g})", file=sys.stderr)
    return out
