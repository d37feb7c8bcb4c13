"""Headless Chromium for checking HTML reports: the rendered DOM, console messages, a screenshot.

Debian's ``chromium`` package (``/usr/bin/chromium``); ``tools/setup_system.sh`` installs it
where apt is usable.  Console messages come from Chromium's own log (``--enable-logging``),
where every ``console.*`` call and every uncaught error is an ``INFO:CONSOLE`` line.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--disable-extensions", "--allow-file-access-from-files"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def why_no_chromium() -> str:
    """The reason Chromium cannot be had here (for a skip message)."""
    if shutil.which("apt-get") is None:
        return "chromium is not installed and apt-get is not available to install it"
    if os.geteuid() != 0:
        return "chromium is not installed and installing it needs root: sudo apt-get install -y chromium"
    return "chromium is not installed (run tools/setup_system.sh, or apt-get install -y chromium)"


@dataclass
class PageResult:
    dom: str
    console: list[str]
    screenshot: str | None


_CONSOLE = re.compile(r":CONSOLE(?:\(\d+\)|:\d+)?\]\s*(.*)")


def load_page(path: str, screenshot: str | None = None, size=(1400, 1000), timeout: float = 120,
              budget_ms: int = 10000) -> PageResult:
    """Load a local HTML file: its DOM after scripts ran, its console lines, and optionally a PNG."""
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError(why_no_chromium())
    url = "file://" + os.path.abspath(path)
    with tempfile.TemporaryDirectory(prefix="narch-chromium-") as profile:
        common = [exe, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                  f"--virtual-time-budget={budget_ms}", f"--window-size={size[0]},{size[1]}"]
        r = subprocess.run(common + ["--dump-dom", url], capture_output=True, text=True, timeout=timeout)
        console = [m.group(1) for line in r.stderr.splitlines() if (m := _CONSOLE.search(line))]
        shot = None
        if screenshot:
            r2 = subprocess.run(common + [f"--screenshot={os.path.abspath(screenshot)}", url],
                                capture_output=True, text=True, timeout=timeout)
            console += [m.group(1) for line in r2.stderr.splitlines() if (m := _CONSOLE.search(line))]
            if os.path.exists(screenshot):
                shot = screenshot
    return PageResult(r.stdout, console, shot)
