"""The output folder of ``dualclip eval``: results are kept across runs (a category saved with the same
fingerprint is reused), so the folder is written in place, one file at a time, each file atomically.

Guarantees: a file dualclip did not write is never replaced (a folder that is not empty must hold the marker of
an earlier eval, and every file the run will write that exists already must be listed in it); nothing is
written through a symbolic link; a category name is a plain file name (it names ``categories/<name>.json``);
one run at a time writes a given folder (:func:`.folder.output_lock`). The marker lists a file before the file
is written, so an interrupted run leaves a folder the next run resumes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import write_json, write_text
from ..data.images import OUTPUT_MARKER
from .folder import OutputFolderError, _files_under, _written_files, check_parent, lies_outside

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


def _earlier_eval(out: Path) -> set[str] | None:
    """The files an eval folder without a marker holds, when every one of them is an eval result: each
    ``categories/*.json`` a JSON object with a fingerprint, ``results.json`` one with its config and categories,
    and ``results.md`` / ``results.csv`` only beside such a ``results.json``; else None."""

    def document(rel: str, *keys: str) -> bool:
        try:
            doc = json.loads((out / rel).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return False
        return isinstance(doc, dict) and all(k in doc for k in keys)

    found = _files_under(out)
    summary = "results.json" in found and document("results.json", "config", "categories")
    for rel in found:
        parts = rel.split("/")
        if rel in RESULT_FILES:
            ok = summary
        elif len(parts) == 2 and parts[0] == "categories" and parts[1].endswith(".json"):
            ok = document(rel, "fingerprint")
        else:
            ok = False
        if not ok:
            return None
    return found


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
            if os.path.lexists(out / rel) and rel not in listed:
                raise OutputFolderError(
                    f"output folder {out} holds {rel}, which dualclip eval did not write; it is never replaced: "
                    "move it or choose another folder"
                )
        self.files = set(listed)

    @staticmethod
    def _listed(out: Path) -> set[str]:
        marker = out / OUTPUT_MARKER
        if marker.exists():
            listed = _written_files(out, strict=True)
            try:
                command = json.loads(marker.read_text(encoding="utf-8")).get("command")
            except (OSError, ValueError, AttributeError, RecursionError):
                command = None
            if listed is None or command != COMMAND:
                what = f"the output of dualclip {command}" if isinstance(command, str) else "an unreadable marker"
                raise OutputFolderError(
                    f"output folder {out} holds {what}, not of an evaluation: choose another folder"
                )
            return listed
        earlier = _earlier_eval(out)
        if earlier is None:
            raise OutputFolderError(
                f"output folder {out} is not empty and holds no results of dualclip eval ({OUTPUT_MARKER} is "
                "missing): nothing in it is replaced; choose an empty or new folder"
            )
        return earlier

    def _record(self, rel: str) -> None:
        if lies_outside(self.out, rel):  # a link made during the run
            raise OutputFolderError(f"output folder {self.out}: {rel} would be written through a symbolic link")
        if rel not in self.files or not (self.out / OUTPUT_MARKER).is_file():  # listed, or a folder adopted
            self.files.add(rel)
            marker = {"tool": "dualclip", "version": __version__, "command": COMMAND, "files": sorted(self.files)}
            write_json(self.out / OUTPUT_MARKER, marker)

    def write_json(self, rel: str, value: Any) -> None:
        self._record(rel)
        write_json(self.out / rel, value)

    def write_text(self, rel: str, text: str) -> None:
        self._record(rel)
        write_text(self.out / rel, text)
