"""Runs ``forge_real_check.py`` (Flux on Forge 2's REAL text path: Long-CLIP pooling and fp32 on both slots
against fp32 references, Auto against Forge's own loader, Built-in bit for bit) in Forge's venv.

Skipped unless ``TE_SWITCH_FORGE_SRC`` names a Forge 2.x checkout; ``TE_SWITCH_FORGE_PYTHON`` is its venv's
python (default: this one, which then needs Forge's requirements). A subprocess, so Forge's ``backend``
never meets the fake one in one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = os.environ.get("TE_SWITCH_FORGE_SRC", "")
PYTHON = os.environ.get("TE_SWITCH_FORGE_PYTHON") or sys.executable
CHECK = Path(__file__).with_name("forge_real_check.py")


@pytest.mark.skipif(not SRC, reason="set TE_SWITCH_FORGE_SRC (and TE_SWITCH_FORGE_PYTHON) to a Forge 2.x checkout")
def test_flux_long_clip_and_fp32_on_real_forge(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONDONTWRITEBYTECODE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TE_SWITCH_SCRATCH": str(tmp_path),
    }
    done = subprocess.run(
        [PYTHON, "-B", str(CHECK)], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=1800
    )
    print(done.stdout[-4000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ALL REAL-FORGE FLUX CHECKS PASSED" in done.stdout
