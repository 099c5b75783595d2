"""Headless Chromium for the HTML report (test and docs helper, not shipped): a PNG screenshot of it (the figure of docs/cli.md) and the browser test.

Uses the system's Chromium (Debian: ``apt-get install chromium``) driven by Playwright, which then downloads
no browser of its own. Optional: needs ``pip install playwright`` (in the ``dev`` extra).
"""

from __future__ import annotations

import shutil
from pathlib import Path

# A closed network and a root user: no sandbox, nothing phoned home at start.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def find_chromium() -> str | None:
    """Path of the system's Chromium, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def launch(playwright):
    """A headless Chromium browser from a running ``sync_playwright()`` context."""
    exe = find_chromium()
    if exe is None:
        raise RuntimeError("no Chromium found on PATH (Debian: apt-get install chromium)")
    return playwright.chromium.launch(executable_path=exe, args=list(CHROMIUM_ARGS))


def screenshot(
    html: str | Path, png: str | Path, width: int = 1100, height: int = 800, full_page: bool = False
) -> Path:
    """Render ``html`` (a file) in headless Chromium and save a PNG of it."""
    from playwright.sync_api import sync_playwright

    png = Path(png)
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(Path(html).resolve().as_uri())
            page.wait_for_load_state("load")
            png.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(png), full_page=full_page)
        finally:
            browser.close()
    return png
