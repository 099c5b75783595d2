"""Runs the `dualclip` command in a child process with the tiny random test CLIP registered (for the kill
and signal tests). ``DUALCLIP_TEST_SLEEP`` (seconds) makes every scoring call sleep first, so that a signal
lands while the run is busy.

    python tests/cli_subprocess.py predict IMAGES --out DIR --backbone dualclip-tiny-test --pretrained random
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY, TINY_CONFIG  # noqa: E402

folder = Path(tempfile.mkdtemp(prefix="dualclip-tiny-"))
(folder / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG))
open_clip.add_model_config(folder)

from dualclip.cli.main import app  # noqa: E402
from dualclip.detector import DualClipDetector  # noqa: E402

delay = float(os.environ.get("DUALCLIP_TEST_SLEEP", "0"))
if delay:
    real = DualClipDetector.score_images

    def slow(self, *args, **kwargs):
        time.sleep(delay)
        return real(self, *args, **kwargs)

    DualClipDetector.score_images = slow

# A test run started in the background of a non-interactive shell inherits SIGINT ignored, and Python then
# installs no KeyboardInterrupt handler: restore it, so that the signal tests test the CLI, not the launcher.
signal.signal(signal.SIGINT, signal.default_int_handler)
print("ready", file=sys.stderr, flush=True)
app(prog_name="dualclip")
