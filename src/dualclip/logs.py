"""Logging for dualclip: every module logs to a child of the ``dualclip`` logger (``logging.getLogger(__name__)``).

The library installs no handler: an application decides where the records go (Python's last-resort handler
prints warnings and errors to stderr meanwhile). The command line installs one (``cli/main.configure_logging``):
one line per record on stderr, ``-q`` for warnings only, ``-v`` for debug.

Some functions take a ``warn`` hook (a callable taking one line of text, for callers that collect the messages);
:func:`log_line` is their default: it logs the line at the level its prefix names.
"""

from __future__ import annotations

import logging

LOGGER = "dualclip"
_PREFIXES = (("error: ", logging.ERROR), ("warning: ", logging.WARNING))


def log_line(message: str, logger: logging.Logger | None = None) -> None:
    """Log one line of a ``warn`` hook: ``"error: ..."`` at ERROR, ``"warning: ..."`` at WARNING (the prefix
    removed: the handler writes its own), anything else (progress text) at INFO."""
    logger = logger or logging.getLogger(LOGGER)
    for prefix, level in _PREFIXES:
        if message.startswith(prefix):
            logger.log(level, "%s", message[len(prefix) :])
            return
    logger.info("%s", message)
