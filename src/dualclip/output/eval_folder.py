"""The output folder of ``dualclip eval``: results are kept across runs (a category saved with the same
fingerprint is reused), so the folder is written in place, one file at a time, each file atomically.

Guarantees: a file dualclip did not write is never replaced (a folder that is not empty must hold the marker of
an earlier eval, and every file the run will write that exists already must be listed in it); nothing is
written through a symbolic link; a category name is a plain file name (it names ``categories/<name>.json``);
one run at a time writes a given folder (:func:`.folder.output_lock`). The marker lists a file before the file
is written, so an interrupted run leaves a folder the next run resumes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import write_json, write_text
from ..data.images import OUTPUT_MARKER
from .folder import OutputFolderError, _written_files, check_parent, lies_outside, written_by

RESULT_FILES = ("results.json", "results.md", "results.csv")
COMMAND = "eval"


def category_file(name: str) -> str:
    """``categories/<name>.json``, the file of one category; an :class:`OutputFolderError` when ``name`` is not
    a plain file name (empty, ``.``/``..``, a path separator or a NUL, or longer than 200 characters)."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0") or len(name) > 200:
        raise OutputFolderError(
            f"category name {name!r} is not a plain file name: it names the file categories/<name>.json of the "
            "results, so it may hold no path separator, no NUL, and may not be '.' or '..'"
        )
    return f"categories/{name}.json"


class EvalFolder:
    """The checked output folder of one evaluation run; :meth:`write_json` / :meth:`write_text` write a file of
    the run (a path relative to the folder, listed in the marker first).

    Parameters
    ----------
    out:
        The folder (created with its parents when missing).
    names:
        Every category the run may write (checked as file names up front).
    """

    def __init__(self, out: str | os.PathLike, names: Iterable[str]) -> None:
        self.out = Path(out)
        targets = [*RESULT_FILES, *(category_file(n) for n in names)]
        out = self.out
        if out.is_symlink():
            raise OutputFolderError(
                f"output folder {out} is a symbolic link (to {os.readlink(out)}); give the real folder"
            )
        if out.exists() and not out.is_dir():
            raise OutputFolderError(f"output folder {out} exists and is a file, not a folder")
        check_parent(out, "the output folder", created=True)
        listed: set[str] = set()
        if out.is_dir() and any(out.iterdir()):
            listed = self._listed(out)
        if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
            raise OutputFolderError(f"output folder {out} is not writable (permission denied)")
        for rel in targets:
            if lies_outside(out, rel):
                raise OutputFolderError(
                    f"output folder {out}: {rel} would be written through a symbolic link; dualclip never writes "
                    "through one: remove the link or choose another folder"
                )
            if os.path.lexists(out / rel) and not (out / rel).is_file():
                raise OutputFolderError(
                    f"output folder {out}: {rel} is not a regular file (a folder, a FIFO or a device); dualclip "
                    "never replaces it: move it or choose another folder"
                )
            if os.path.lexists(out / rel) and rel not in listed:
                raise OutputFolderError(
                    f"output folder {out} holds {rel}, which dualclip eval did not write; it is never replaced: "
                    "move it or choose another folder"
                )
        self.files = set(listed)

    @staticmethod
    def _listed(out: Path) -> set[str]:
        marker = out / OUTPUT_MARKER
        if not marker.is_file() or marker.is_symlink():  # never read a FIFO or a device: it may never end
            state = "missing" if not os.path.lexists(marker) else "not a regular file"
            raise OutputFolderError(
                f"output folder {out} is not empty and holds no results of dualclip eval ({OUTPUT_MARKER} is "
                f"{state}): nothing in it is replaced; choose an empty or new folder"
            )
        listed = _written_files(out, strict=True)
        command = written_by(out)
        if listed is None or command is None:
            raise OutputFolderError(
                f"output folder {out}: its {OUTPUT_MARKER} cannot be read or lists no files: nothing in it is "
                "replaced; choose another folder"
            )
        if command != COMMAND:
            raise OutputFolderError(
                f"output folder {out} holds the output of dualclip {command}, not of an evaluation: choose another "
                "folder"
            )
        return listed

    def _record(self, rel: str) -> None:
        if lies_outside(self.out, rel):  # a link made during the run
            raise OutputFolderError(f"output folder {self.out}: {rel} would be written through a symbolic link")
        if rel not in self.files or not (self.out / OUTPUT_MARKER).is_file():  # not listed yet, or a first write
            self.files.add(rel)
            marker = {"tool": "dualclip", "version": __version__, "command": COMMAND, "files": sorted(self.files)}
            write_json(self.out / OUTPUT_MARKER, marker)

    def write_json(self, rel: str, value: Any) -> None:
        self._record(rel)
        write_json(self.out / rel, value)

    def write_text(self, rel: str, text: str) -> None:
        self._record(rel)
        write_text(self.out / rel, text)
