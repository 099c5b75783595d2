"""The output folder of ``dualclip predict``: checked before any work, written in a staging sibling, and
swapped into place only when the run has succeeded.

Guarantees: a file dualclip did not write is never deleted (an existing folder is replaced only if it holds
the marker of an earlier dualclip run and nothing but the files that run listed in it, each a plain path inside
the folder); ``--out`` never is, nor lies above, an input; an interrupted or failed run leaves ``--out`` as it
was; one run at a time writes a given ``--out`` (a lock file beside it); a file put into ``--out`` during a run
stays there (or, when the new run took its name, the run says where it went).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import stat
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

from .. import __version__
from ..atomic import take_folder_settings, write_json
from ..data.images import OUTPUT_LOCK_SUFFIX, OUTPUT_MARKER
from ..errors import OutputError


class OutputFolderError(OutputError):
    """The output folder cannot be used (a usage error)."""


def lies_outside(folder: Path, entry: object) -> bool:
    """True when a marker entry is not a plain relative path inside ``folder``: not text, absolute, with a
    ``..``, or through a symbolic link (dualclip writes none of these)."""
    if not isinstance(entry, str) or not entry:
        return True
    parts = PurePosixPath(entry).parts
    if not parts or PurePosixPath(entry).is_absolute() or ".." in parts:
        return True
    here = folder
    for part in parts:
        here = here / part
        if here.is_symlink():
            return True
    return False


def _written_files(folder: Path, strict: bool = False) -> set[str] | None:
    """The files an earlier dualclip run listed in its marker (relative paths), or None without a readable
    marker. ``strict``: a marker listing a path outside ``folder`` is an :class:`OutputFolderError` (else such
    entries are dropped)."""
    marker = folder / OUTPUT_MARKER
    if not marker.is_file():
        return None
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    if not isinstance(files, list):
        return None
    bad = [f for f in files if lies_outside(folder, f)]
    if bad and strict:
        raise OutputFolderError(
            f"--out {folder}: its {OUTPUT_MARKER} lists {bad[0]!r}, which lies outside the folder (an absolute "
            "path, '..' or a symbolic link); dualclip never writes such a marker, so nothing is replaced: remove "
            "the marker or choose another folder"
        )
    return {f for f in files if f not in bad}


def written_by(folder: Path) -> str | None:
    """The command whose output ``folder`` holds (``predict``, ``demo``; from its marker), or None."""
    if not (folder / OUTPUT_MARKER).is_file():  # never read a FIFO or a device: it may never end
        return None
    try:
        doc = json.loads((folder / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return doc.get("command", "predict") if isinstance(doc, dict) else None


def _files_under(folder: Path) -> set[str]:
    """Every file under ``folder`` (relative paths), and every symbolic link to a folder (never followed)."""
    found = set()
    for d, dirs, files in os.walk(folder):
        found |= {str((Path(d) / f).relative_to(folder)) for f in files}
        found |= {str((Path(d) / f).relative_to(folder)) for f in dirs if (Path(d) / f).is_symlink()}
    return found - {OUTPUT_MARKER}


def check_parent(out: Path, flag: str = "--out", created: bool = False) -> None:
    """Refuse an ``out`` whose folder does not exist or cannot be written (before any work). ``created``: a
    missing folder will be made, so the nearest one that exists must be writable."""
    parent = out.absolute().parent
    if created:
        parent = next(p for p in (parent, *parent.parents) if p.exists())
    if not parent.is_dir():
        raise OutputFolderError(f"the folder of {flag} ({parent}) does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputFolderError(f"cannot write in {parent} (permission denied)")


def lock_path(out: Path) -> Path:
    """The lock file of ``out`` (beside it; kept after a run, since removing a lock file races with a waiter)."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name[:100]}{OUTPUT_LOCK_SUFFIX}"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the lock of ``out`` for a whole run: a second run into the same folder is refused at once with an
    :class:`OutputFolderError`. Where ``out``'s folder is missing or not writable nothing is locked (the
    checks that follow refuse it)."""
    from filelock import FileLock, Timeout

    path = lock_path(out)
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK | os.X_OK):
        yield
        return
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OutputFolderError(
            f"{path}, the lock file of --out {out}, is a link or not a file: dualclip never writes through it; "
            "remove it or choose another folder"
        )
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputFolderError(
            f"another dualclip run is writing --out {out} (it holds {path}): wait for it to finish or "
            "choose another folder"
        ) from None
    except OSError as exc:
        raise OutputFolderError(f"cannot take the lock file {path} of --out {out}: {exc.strerror or exc}") from None
    try:
        yield
    finally:
        lock.release()


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
    here = Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise OutputFolderError(
            f"--out {out} is or holds the folder you are in: its outputs are swapped in as a new folder, which would "
            "leave you in a deleted one; give --out a folder of its own (e.g. -o results)"
        )
    check_parent(resolved)
    if out.is_dir() and any(out.iterdir()):
        listed = _written_files(out, strict=True)
        if listed is None:
            raise OutputFolderError(
                f"--out {out} is not empty and was not written by dualclip "
                f"({'an unreadable or invalid' if (out / OUTPUT_MARKER).exists() else 'no'} {OUTPUT_MARKER}); "
                "it is never replaced, even with --overwrite: choose another folder"
            )
        command = written_by(out)
        if command not in ("predict", "demo"):
            raise OutputFolderError(
                f"--out {out} holds the output of dualclip {command}; predict never replaces it: choose another folder"
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


def _unlink_inside(folder: Path, entry: str) -> None:
    """Delete the regular file ``entry`` under ``folder``, reached without following any symbolic link (so a
    marker changed during the run cannot reach outside the folder); anything else is left alone."""
    parts = PurePosixPath(entry).parts
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        fd = os.open(folder, flags)
    except OSError:
        return
    try:
        for part in parts[:-1]:
            inner = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = inner
        if stat.S_ISREG(os.stat(parts[-1], dir_fd=fd, follow_symlinks=False).st_mode):
            os.unlink(parts[-1], dir_fd=fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_written(folder: Path) -> None:
    """Delete what an earlier run listed in its marker (plain paths inside ``folder`` only), then the marker and
    the folders those files were in, once empty; anything else stays."""
    listed = _written_files(folder) or set()
    for rel in listed:
        _unlink_inside(folder, rel)
    _unlink_inside(folder, OUTPUT_MARKER)
    dirs = {folder / p for rel in listed for p in PurePosixPath(rel).parents if p != PurePosixPath(".")}
    for d in sorted(dirs, key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()  # only if empty


def _keep_leftovers(previous: Path, out: Path, warn: Callable[[str], None]) -> None:
    """What is left in ``previous`` (the folder ``out`` was before the swap) once the earlier run's files are
    gone was put there by someone else during the run: move it back into ``out`` where the new run left its
    name free; what cannot go back stays in a visible sibling, and ``warn`` says where."""
    moved, clashed = [], []

    def visit(rel: PurePosixPath) -> None:
        for entry in sorted(os.scandir(previous / rel), key=lambda e: e.name):
            r, dst = rel / entry.name, out / rel / entry.name
            if not os.path.lexists(dst):
                os.rename(entry.path, dst)
                moved.append(str(r))
            elif entry.is_dir(follow_symlinks=False) and dst.is_dir() and not dst.is_symlink():
                visit(r)
            else:
                clashed.append(str(r))

    visit(PurePosixPath())
    for d, _, _ in sorted(os.walk(previous), key=lambda t: -len(t[0])):
        with contextlib.suppress(OSError):
            Path(d).rmdir()  # only if empty
    if moved:
        warn(
            f"warning: {len(moved)} file(s) written into {out} during the run were kept in place "
            f"({_shown(moved)}); dualclip did not write them, so it will not replace {out} while they are there"
        )
    if clashed:
        kept = out.parent / f"{out.name}.kept-{uuid.uuid4().hex[:8]}"
        os.rename(previous, kept)
        warn(
            f"warning: {len(clashed)} file(s) written into {out} during the run had names the new run wrote; "
            f"they were moved to {kept} ({_shown(clashed)})"
        )


def _shown(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (" ..." if len(names) > most else "")


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
def staged_output(
    out: Path, warn: Callable[[str], None] = lambda msg: None, command: str = "predict"
) -> Iterator[Path]:
    """Yield a fresh staging folder beside ``out``; on success its content replaces ``out`` in one step (the
    earlier run's files removed afterwards; files others put into ``out`` meanwhile kept, see
    :func:`_keep_leftovers`), on any error or interrupt the staging folder is removed and ``out`` is left as it
    was. ``command`` is recorded in the marker."""
    for stale in _stale_staging(out):  # left by a killed run; made by dualclip (it holds the .staging tag)
        shutil.rmtree(stale, ignore_errors=True)
    staging = out.parent / f".{out.name[:100]}.dualclip-staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    if out.is_dir() and not out.is_symlink():  # the folder it replaces: its group and mode (a private 0o700 stays so)
        take_folder_settings(staging, out)
    (staging / ".staging").write_text(str(os.getpid()))
    try:
        yield staging
        files = sorted(_files_under(staging) - {".staging"})
        marker = {"tool": "dualclip", "version": __version__, "command": command, "files": files}
        write_json(staging / OUTPUT_MARKER, marker)
        (staging / ".staging").unlink()
    except BaseException:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    # from here on staging may hold the previous run (after the exchange): never removed on an error; SIGINT and
    # SIGTERM wait until the outputs are in place
    with _signals_deferred():
        _commit(staging, out, warn)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (delivered on exit) where this is the main thread; else nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _commit(staging: Path, out: Path, warn: Callable[[str], None]) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    if not any(out.iterdir()):  # an empty folder the user made (its mode and group are the staging folder's)
        if _exchange(staging, out):  # the outputs in place at once; the empty folder goes
            staging.rmdir()
            return
        for item in sorted(staging.iterdir(), key=lambda p: p.name == OUTPUT_MARKER):
            os.rename(item, out / item.name)
        staging.rmdir()
        return
    if _exchange(staging, out):  # out is now the new run; staging holds the previous one
        previous = staging
    else:
        previous = out.parent / f".{out.name[:100]}.dualclip-previous-{uuid.uuid4().hex[:8]}"
        os.rename(out, previous)
        try:
            os.rename(staging, out)
        except BaseException:
            os.rename(previous, out)
            raise
    if previous.is_symlink() or not previous.is_dir():  # --out was replaced by a file or a link during the run
        kept = out.parent / f"{out.name}.kept-{uuid.uuid4().hex[:8]}"
        os.rename(previous, kept)
        warn(f"warning: {out} was replaced during the run by something dualclip did not write; it is now {kept}")
        return
    _remove_written(previous)
    _keep_leftovers(previous, out, warn)
