"""The headless browser the demo's browser tests drive: Debian's `chromium` and `chromium-driver`.

`tessera setup browser` installs them with apt-get; `find_browser` locates them or says how to.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

PACKAGES = ("chromium", "chromium-driver")


class BrowserSetupError(RuntimeError):
    """The browser is missing, or installing it failed."""


def find_browser() -> tuple[Path, Path]:
    """(chromium, chromedriver) executables; a clear error names what is missing and the fix."""
    found = {name: shutil.which(name) for name in ("chromium", "chromedriver")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise BrowserSetupError(f"{' and '.join(missing)} not found on PATH: run `tessera setup browser` "
                                f"(apt-get install {' '.join(PACKAGES)})")
    return Path(found["chromium"]), Path(found["chromedriver"])


def install_browser() -> tuple[Path, Path]:
    """apt-get update, then apt-get install -y chromium chromium-driver (needs root); returns `find_browser()`."""
    if shutil.which("apt-get") is None:
        raise BrowserSetupError(f"apt-get not found: install {' and '.join(PACKAGES)} with this system's "
                                "package manager")
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", *PACKAGES]):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise BrowserSetupError(f"`{' '.join(command)}` failed (exit {done.returncode}): "
                                    f"{lines[-1] if lines else 'no output'}")
    return find_browser()
