"""The output folder of ``dualclip predict``: checked before any work, written in a staging sibling, and
swapped into place only when the run has succeeded.

Guarantees: a file dualclip did not write is never deleted (an existing folder is replaced only if it holds
the marker of an earlier dualclip run and nothing but the files that run listed in it); ``--out`` never is,
nor lies above, an input; an interrupted or failed run leaves ``--out`` as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from .. import __version__
from ..atomic import write_json
from ..data.images import OUTPUT_MARKER


class OutputFolderError(ValueError):
    """The output folder cannot be used (a usage error)."""


def _written_files(folder: Path) -> set[str] | None:
    """The files an earlier dualclip run listed in its marker (relative paths), or None without a marker."""
    marker = folder / OUTPUT_MARKER
    if not marker.is_file():
        return None
    try:
        doc = json.loads(marker.read_text(encoding="utf-8"))
        return {str(f) for f in doc["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _files_under(folder: Path) -> set[str]:
    return {str((Path(d) / f).relative_to(folder)) for d, _, files in os.walk(folder) for f in files} - {OUTPUT_MARKER}


def check_output_folder(out: Path, inputs: Iterable[Path], overwrite: bool) -> None:
    """Refuse, before anything runs, an ``out`` that cannot or must not be written.

    ``inputs``: every path the run reads (given files and folders, and the files they expand to).
    """
    if out.is_symlink():
        target = os.readlink(out)
        state = "a dangling symbolic link" if not out.exists() else "a symbolic link"
        raise OutputFolderError(f"--out {out} is {state} (to {target}); give a real folder")
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"--out {out} exists and is a file, not a folder")
    resolved = out.resolve()
    for inp in inputs:
        r = Path(inp).resolve()
        if r == resolved or resolved in r.parents:
            raise OutputFolderError(
                f"--out {out} is or contains the input {inp}: outputs must go to a folder of their own"
            )
    parent = resolved.parent
    if not parent.is_dir():
        raise OutputFolderError(f"the parent folder of --out ({parent}) does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputFolderError(f"cannot write in {parent} (permission denied)")
    if out.is_dir() and any(out.iterdir()):
        listed = _written_files(out)
        if listed is None:
            raise OutputFolderError(
                f"--out {out} is not empty and was not written by dualclip (no {OUTPUT_MARKER}); "
                "it is never replaced, even with --overwrite: choose another folder"
            )
        foreign = sorted(_files_under(out) - listed)
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise OutputFolderError(
                f"--out {out} holds {len(foreign)} file(s) dualclip did not write ({shown}); "
                "it is never replaced: move them or choose another folder"
            )
        if not overwrite:
            raise OutputFolderError(f"output folder {out} exists and is not empty; pass --overwrite to replace it")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise OutputFolderError(f"--out {out} is not writable (permission denied)")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def _remove_written(folder: Path) -> None:
    """Delete what an earlier run listed in its marker, then the marker and the folders left empty; anything
    else stays."""
    listed = _written_files(folder) or set()
    for rel in listed:
        p = folder / rel
        if p.is_file() and not p.is_symlink():
            p.unlink()
    (folder / OUTPUT_MARKER).unlink(missing_ok=True)
    for d, _, _ in sorted(os.walk(folder), key=lambda t: -len(t[0])):
        with contextlib.suppress(OSError):
            Path(d).rmdir()  # only if empty


def _stale_staging(out: Path) -> Iterator[Path]:
    """Staging folders of runs that were killed: made by dualclip (the .staging tag holds the writer's pid)
    and whose process is gone (a run still writing is left alone)."""
    for p in out.parent.glob(f".{out.name[:100]}.dualclip-*"):
        tag = p / ".staging"
        if p.is_dir() and tag.is_file():
            try:
                pid = int(tag.read_text().strip() or 0)
            except (OSError, ValueError):
                continue
            if pid and _alive(pid):
                continue
            yield p


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a fresh staging folder beside ``out``; on success its content replaces ``out`` in one step (the
    earlier run's files removed afterwards), on any error or interrupt the staging folder is removed and
    ``out`` is left as it was."""
    for stale in _stale_staging(out):  # left by a killed run; made by dualclip (it holds the .staging tag)
        shutil.rmtree(stale, ignore_errors=True)
    staging = out.parent / f".{out.name[:100]}.dualclip-staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    (staging / ".staging").write_text(str(os.getpid()))
    try:
        yield staging
        files = sorted(_files_under(staging) - {".staging"})
        write_json(staging / OUTPUT_MARKER, {"tool": "dualclip", "version": __version__, "files": files})
        (staging / ".staging").unlink()
        _commit(staging, out)
    except BaseException:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _commit(staging: Path, out: Path) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    if not any(out.iterdir()):  # an empty folder the user made: keep it, move the outputs in
        for item in sorted(staging.iterdir(), key=lambda p: p.name == OUTPUT_MARKER):
            os.rename(item, out / item.name)
        staging.rmdir()
        return
    if _exchange(staging, out):  # out is now the new run; staging holds the previous one
        _remove_written(staging)
        return
    previous = out.parent / f".{out.name[:100]}.dualclip-previous-{uuid.uuid4().hex[:8]}"
    os.rename(out, previous)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(previous, out)
        raise
    _remove_written(previous)
