"""Atomic file writes, used for every file dualclip writes: a reader sees the old or the new content, never a
partial one, and an interrupted write leaves no file behind under the final name.

Files are created with mode ``0o666`` minus the user's umask (as ``open()`` would), written to a hidden
temporary sibling and moved into place with :func:`os.replace`. JSON is written strictly: non-finite floats
become ``null`` and ``allow_nan=False`` guarantees valid JSON.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

from PIL import Image


def temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name[:200]}.{uuid.uuid4().hex[:12]}.tmp")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` atomically. A file name that is not UTF-8 (its bytes kept as lone surrogates, as
    Python reads them) is written as the escape ``\\udcff``: valid UTF-8, and in JSON the same string again."""
    write_bytes(path, text.encode("utf-8", errors="backslashreplace"))


def finite(value: Any) -> Any:
    """``value`` with every NaN / infinite float (also numpy scalars) replaced by ``None``, recursively."""
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    if isinstance(value, float) or type(value).__name__ in ("float32", "float64", "float16"):
        v = float(value)
        return v if math.isfinite(v) else None
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return finite(value.item())
    return value


def dumps(value: Any, indent: int | None = 2) -> str:
    """Strict JSON text (no NaN or Infinity: they become ``null``)."""
    return json.dumps(finite(value), indent=indent, allow_nan=False, ensure_ascii=False)


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Write ``value`` as strict JSON, atomically."""
    write_text(path, dumps(value) + "\n")


def save_image(image: Image.Image, path: str | os.PathLike, format: str = "PNG") -> None:
    """Save a PIL image atomically."""
    import io

    buf = io.BytesIO()
    image.save(buf, format=format)
    write_bytes(path, buf.getvalue())


def take_folder_settings(new: str | os.PathLike, old: str | os.PathLike) -> None:
    """Give the folder ``new`` (made to replace ``old``) ``old``'s group and permission bits, setgid included,
    so that replacing a private (``0o700``) or group-shared folder keeps it so; files made in ``new`` afterwards
    inherit the group where the setgid bit is set. Best effort: a group the user does not belong to is kept
    as it was."""
    import stat

    st = os.stat(old)
    try:
        os.chown(new, -1, st.st_gid)
    except OSError:
        pass
    os.chmod(new, stat.S_IMODE(st.st_mode))  # after chown, which may clear the setgid bit


def named_path(path: str | os.PathLike) -> Path:
    """``path``, or its absolute form where its last part is no name of its own (``''``, ``.``, ``..``): such a
    path cannot be renamed (``rename('.', ...)`` is refused), the folder it names can."""
    path = Path(path)
    return Path(os.path.abspath(path)) if path.name in ("", ".", "..") else path
