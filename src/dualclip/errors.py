"""The errors dualclip raises on purpose: one hierarchy under :class:`DualclipError`.

A ``DualclipError`` is a problem with what the caller gave (an image, a folder, a setting, a profile) or with
what the machine offers (weights that cannot be reached, an optional extra not installed): its message says
what is wrong and what to do, in terms of parameters (``memory_bank_size=``), never of command-line flags. The
command line prints it as one ``error: ...`` line and exits with code 2. Any other exception is a bug (or an
environment failure such as running out of memory mid-run): the command line exits with code 1 and points to
``--debug`` for the traceback.

Most classes also subclass the built-in exception that the same error was before this hierarchy existed
(``ValueError``, ``RuntimeError``, ``FileNotFoundError``, ``ImportError``): code that caught those keeps working.
New code catches :class:`DualclipError` or one of its subclasses.
"""

from __future__ import annotations


class DualclipError(Exception):
    """The base of every error dualclip raises on purpose (bad input, settings, profile, weights, output)."""


class ConfigError(DualclipError, ValueError):
    """A setting that is not valid: a value out of range, an unknown name, settings that contradict each other,
    or a device this machine does not have. Also a ``ValueError`` (settings were checked with ``ValueError``
    before)."""


class InputError(DualclipError, ValueError):
    """Input that cannot be used: an image, a mask, a folder of images, a manifest, a dataset layout, a
    checkpoint or ONNX file, or images that do not suit the call (too few, copies of one image). Also a ``ValueError`` for backwards
    compatibility."""


class InputNotFoundError(InputError, FileNotFoundError):
    """An input path (file, folder, pattern) that does not exist or holds no image. Also a
    ``FileNotFoundError`` (it was one before)."""


class ProfileError(DualclipError, ValueError):
    """A profile cannot be saved, read, or used with this model. Also a ``ValueError`` for backwards
    compatibility."""


class WeightsUnavailableError(DualclipError, RuntimeError):
    """Pretrained weights could neither be found in the cache nor downloaded. Also a ``RuntimeError`` (it was
    one before). A checkpoint or ONNX file that was given but cannot be read is an :class:`InputError`."""


class MissingDependencyError(DualclipError, ImportError):
    """An optional extra this call needs is not installed (the message names the ``pip install`` line). Also
    an ``ImportError``."""


class OutputError(DualclipError, ValueError):
    """An output folder or file that cannot be used (not ours to overwrite, a file where a folder is needed, a
    missing parent folder). Also a ``ValueError`` for backwards compatibility."""


class UsageError(DualclipError, ValueError):
    """A command-line invocation that cannot work (options that contradict each other, a missing option).
    Raised by the command-line layer only; its messages name flags."""


class IncompleteRunError(DualclipError, RuntimeError):
    """A run that stopped before its end for a reason outside the inputs (a worker lost): what was finished is
    kept, and running it again resumes. Also a ``RuntimeError``."""


__all__ = [
    "ConfigError",
    "DualclipError",
    "IncompleteRunError",
    "InputError",
    "InputNotFoundError",
    "MissingDependencyError",
    "OutputError",
    "ProfileError",
    "UsageError",
    "WeightsUnavailableError",
]
