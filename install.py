"""Run by the WebUI at every start (``python install.py``, extension root on ``sys.path``).

Installs only what the WebUI lacks: ``gguf``, to read GGUF text encoders (A1111 does not ship it;
Forge does). It needs only ``numpy>=1.17``, so A1111's numpy 1.26 pin is left alone. Quick when
there is nothing to do (no pip call), and skipped with ``--skip-install``.
"""

from __future__ import annotations

import importlib.metadata
import re

GGUF = "gguf"
GGUF_MIN = (0, 13)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def gguf_ok() -> bool:
    """True when a usable ``gguf`` (>= 0.13) is installed."""
    try:
        return _version_tuple(importlib.metadata.version(GGUF)) >= GGUF_MIN
    except importlib.metadata.PackageNotFoundError:
        return False


def skip_install() -> bool:
    """``--skip-install`` on the WebUI's command line (adetailer's pattern)."""
    try:
        import launch

        return bool(launch.args.skip_install)
    except Exception:  # not started by a WebUI, or an unusual launcher: install normally
        return False


def main() -> int:
    if skip_install() or gguf_ok():
        return 0
    import launch

    launch.run_pip(f'install "{GGUF}>={".".join(map(str, GGUF_MIN))}"', "gguf for TE Switch (GGUF text encoders)")
    return 0


if __name__ == "__main__":
    main()
