"""README's first command as a newcomer runs it: a clean clone, a fresh virtual environment, the
install line and the demo grid exactly as README.md writes them (pip's wheel cache may help).

It installs packages, so it needs the package registry (or a warm pip cache) and a few minutes;
``TE_SWITCH_SKIP_INSTALL_TEST=1`` skips it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    os.environ.get("TE_SWITCH_SKIP_INSTALL_TEST") == "1", reason="TE_SWITCH_SKIP_INSTALL_TEST=1"
)


def readme_commands() -> dict[int, str]:
    """The numbered commands of README's opening code block: {1: 'pip install ...', 2: 'bash ...'}."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md opens with no bash block"
    commands: dict[int, str] = {}
    number = None
    for line in block.group(1).splitlines():
        heading = re.match(r"#\s*(\d+)\.", line)
        if heading:
            number = int(heading.group(1))
        elif line.strip() and number is not None and number not in commands:
            commands[number] = line.strip()
    return commands


def test_readme_has_the_two_commands() -> None:
    commands = readme_commands()
    assert sorted(commands) == [1, 2]
    assert "python -m te_switch" in commands[1]
    assert commands[2] == "bash tests/run.sh"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git for a clean clone")
def test_command_1_in_a_fresh_venv_from_a_clean_clone(tmp_path: Path) -> None:
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: nothing to clone")
    clone, venv = tmp_path / "te-switch", tmp_path / "venv"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(venv),
        "TE_SWITCH_CACHE": str(tmp_path / "cache"),  # the demo is built anew, as on a first run
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    start = time.monotonic()
    run = subprocess.run(
        ["bash", "-c", readme_commands()[1]], cwd=clone, env=env, capture_output=True, text=True, timeout=2700
    )
    seconds = time.monotonic() - start
    assert run.returncode == 0, f"command 1 failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    print(f"command 1 in a fresh venv: {seconds:.0f} s")  # reported with -s / in the log

    from PIL import Image

    grid = clone / "grid.png"
    assert grid.is_file(), "command 1 wrote no grid.png"
    with Image.open(grid) as image:
        assert image.format == "PNG"
        assert "Steps:" in image.text["parameters"]  # WebUI-style infotext of a cell
        document = json.loads(image.text["te_switch.grid"])
    assert len(document["cells"]) >= 2
    # the venv really holds the project, and its torch is the one README pins
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import te_switch, torch; print(te_switch.__file__, torch.__version__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # not a folder holding te_switch/: the import must come from the venv
        timeout=120,
        check=True,
    )
    location, version = probe.stdout.split()
    assert Path(location).resolve().is_relative_to(clone.resolve())
    pin = re.search(r"torch==([\w.+]+)", readme_commands()[1])
    assert pin, "README's command 1 pins no torch"
    assert version.split("+")[0] == pin.group(1)
