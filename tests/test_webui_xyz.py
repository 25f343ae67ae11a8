"""X/Y/Z plot axes: registered once, values land on the cell's p and win over the panel."""

from __future__ import annotations

import copy
import types
from pathlib import Path
from typing import Any

import pytest
from test_webui_support import FakeHost, use_host, webui, write_clip  # noqa: F401 - fixture

from te_switch.core.selection import Selection, SlotChoice


def fake_xyz_grid() -> types.ModuleType:
    """The parts of scripts/xyz_grid.py an extension touches (A1111 1.10.1 / Forge signatures)."""
    module = types.ModuleType("xyz_grid.py")

    def format_value_add_label(p: Any, opt: Any, x: Any) -> str:
        return f"{opt.label}: {x}"

    class AxisOption:
        def __init__(self, label, type, apply, format_value=format_value_add_label, confirm=None, cost=0.0,
                     choices=None, prepare=None):  # fmt: skip
            self.label, self.type, self.apply, self.format_value = label, type, apply, format_value
            self.confirm, self.cost, self.prepare, self.choices = confirm, cost, prepare, choices

    class Script:
        pass

    Script.__module__ = "xyz_grid.py"
    module.AxisOption = AxisOption
    module.Script = Script
    module.axis_options = [AxisOption("Nothing", str, lambda p, x, xs: None), AxisOption("Seed", int, None)]
    return module


@pytest.fixture
def xyz_module(webui: dict[str, Path]) -> types.ModuleType:  # noqa: F811
    from modules import scripts

    module = fake_xyz_grid()
    scripts.scripts_data.append(scripts.ScriptClassData(module.Script, "xyz_grid.py", "", module))
    return module


def axis(module: types.ModuleType, label: str) -> Any:
    return next(o for o in module.axis_options if o.label == label)


def test_axes_added_once(xyz_module: types.ModuleType) -> None:
    from te_switch.webui import xyz

    assert xyz.add_axes() == 10
    assert xyz.add_axes() == 0  # UI reload: on_before_ui runs again
    labels = [o.label for o in xyz_module.axis_options]
    assert labels[2:] == [
        "[TE] CLIP Skip", "[TE] CLIP Skip scope",
        "[TE] CLIP-L", "[TE] CLIP-L precision", "[TE] CLIP-G", "[TE] CLIP-G precision",
        "[TE] CLIP-H", "[TE] CLIP-H precision", "[TE] T5-XXL", "[TE] T5-XXL precision",
    ]  # fmt: skip
    assert axis(xyz_module, "[TE] CLIP-L").cost == 0.8
    assert axis(xyz_module, "[TE] CLIP Skip").choices() == ["Auto", *map(str, range(1, 13))]


def test_no_xyz_script_no_axes(webui: dict[str, Path]) -> None:  # noqa: F811
    from te_switch.webui import xyz

    assert xyz.add_axes() == 0


def test_values_land_on_each_cell(xyz_module: types.ModuleType, webui: dict[str, Path]) -> None:  # noqa: F811
    from modules import processing

    from te_switch.webui import xyz

    write_clip(webui["clip"] / "a.safetensors")
    xyz.add_axes()
    clip_skip, encoder = axis(xyz_module, "[TE] CLIP Skip"), axis(xyz_module, "[TE] CLIP-L")
    assert encoder.choices() == ["Built-in", "a.safetensors"]
    parent = processing.StableDiffusionProcessingTxt2Img(prompt="x")
    cells = []
    for x in ["Auto", "2"]:
        for y in ["Built-in", "a.safetensors"]:
            pc = copy.copy(parent)
            clip_skip.apply(pc, x, ["Auto", "2"])
            encoder.apply(pc, y, ["Built-in", "a.safetensors"])
            cells.append(xyz.forced(pc))
    assert cells[3] == {"clip_skip": "2", "clip_l": "a.safetensors"}
    assert cells[0] == {"clip_skip": "Auto", "clip_l": "Built-in"}
    assert xyz.forced(parent) == {}  # cells never write into the shared parent


def test_xyz_cell_wins_through_a_generation(xyz_module: types.ModuleType, webui: dict[str, Path]) -> None:  # noqa: F811
    from modules import processing

    from te_switch.webui import options, script, xyz

    options.register()
    host = FakeHost("sdxl")
    use_host(host)
    write_clip(webui["clip"] / "g.safetensors", kind="clip-g")
    xyz.add_axes()
    pc = processing.StableDiffusionProcessingTxt2Img(prompt="x")
    axis(xyz_module, "[TE] CLIP-G").apply(pc, "g.safetensors", [])
    axis(xyz_module, "[TE] CLIP Skip scope").apply(pc, "CLIP-G only", [])
    axis(xyz_module, "[TE] CLIP-G precision").apply(pc, "fp16", [])
    script.start(pc, (False, 3, "both"))
    assert host.calls[0][1] == Selection(3, "clip_g", {"clip_g": SlotChoice("g.safetensors", "fp16")})


def test_confirm_rejects_bad_values_before_the_grid(xyz_module: types.ModuleType, webui: dict[str, Path]) -> None:  # noqa: F811
    from te_switch.webui import xyz

    write_clip(webui["clip"] / "g.safetensors", kind="clip-g")
    xyz.add_axes()
    axis(xyz_module, "[TE] CLIP Skip").confirm(None, ["Auto", "1", "12"])
    with pytest.raises(RuntimeError, match=r"clip skip must be 1\.\.12 or Auto"):
        axis(xyz_module, "[TE] CLIP Skip").confirm(None, ["13"])
    with pytest.raises(RuntimeError, match=r"\[TE\] CLIP-L: g.safetensors: a CLIP-G file cannot go into the CLIP-L"):
        axis(xyz_module, "[TE] CLIP-L").confirm(None, ["Built-in", "g.safetensors"])
    with pytest.raises(RuntimeError, match="no such encoder"):
        axis(xyz_module, "[TE] CLIP-G").confirm(None, ["missing.safetensors"])


def test_csv_mode_expands_ranges(xyz_module: types.ModuleType) -> None:
    from te_switch.webui import xyz

    xyz.add_axes()
    assert axis(xyz_module, "[TE] CLIP Skip").prepare("Auto, 1-3, 5") == ["Auto", "1", "2", "3", "5"]
