"""The script through a whole (fake) generation: before_process -> overrides -> process -> batches ->
postprocess, with a recording host adapter.

Precedence: X/Y/Z > tab panel > global options (incl. override_settings) > Auto/Built-in.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from test_webui_support import FakeHost, engine_failure, use_host, webui, write_clip  # noqa: F401 - fixture

from te_switch.core.selection import Selection, SlotChoice

NEUTRAL = [True, 1, "both", "Built-in", "Auto", "Built-in", "Auto", "Built-in", "Auto", "Built-in", "Auto"]


@pytest.fixture
def host(webui: dict[str, Path]) -> FakeHost:  # noqa: F811
    from te_switch.webui import options

    options.register()
    fake = FakeHost("sd1")
    use_host(fake)
    return fake


def generate(args: list[Any], *, override: dict[str, Any] | None = None, xyz: dict[str, Any] | None = None,
             raise_after_process: bool = False, prompt: str = "a cat") -> Any:  # fmt: skip
    """One txt2img through the fake WebUI, the way txt2img.py runs it (``with closing(p)``)."""
    from modules import processing, scripts

    from te_switch.webui.script import TESwitchScript

    runner = scripts.ScriptRunner()
    script = TESwitchScript()
    runner.add(script, len(NEUTRAL))
    p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, override_settings=override or {})
    p.scripts = runner
    p.script_args = [None, *args]
    if xyz is not None:
        p.te_switch_xyz = dict(xyz)
    if raise_after_process:

        def boom() -> None:
            raise RuntimeError("sampler exploded")

        p.setup_conds = boom  # fails outside any script hook, so nothing swallows it
    with contextlib.closing(p):
        p.result = processing.process_images(p)
    return p


def applied(host: FakeHost) -> Selection:
    return next(sel for name, sel in host.calls if name == "apply")


def test_neutral_panel_is_auto_and_builtin(host: FakeHost) -> None:
    p = generate(NEUTRAL)
    assert applied(host) == Selection()  # apply(Auto) still runs: it restores a previous swap
    assert host.names() == ["apply", "begin", "end"]
    assert "Clip skip" not in p.extra_generation_params
    assert p.result.images == ["image-0"]


def test_panel_positional_args(host: FakeHost, webui: dict[str, Path]) -> None:  # noqa: F811
    write_clip(webui["clip"] / "gmp.safetensors")
    p = generate([False, 2, "both", "gmp.safetensors", "fp32"])
    sel = applied(host)
    assert sel == Selection(2, "both", {"clip_l": SlotChoice("gmp.safetensors", "fp32")})
    assert host.loaded["clip_l"].path.endswith("gmp.safetensors")
    params = p.extra_generation_params
    assert params["Clip skip"] == 2
    assert params["TE CLIP-L"] == f"gmp.safetensors [{host.loaded['clip_l'].short_hash}]"
    assert len(host.loaded["clip_l"].short_hash) == 10
    assert params["TE CLIP-L precision"] == "fp32"
    assert "Clip skip scope" not in params


def test_dict_args_and_dropdown_decoration(host: FakeHost, webui: dict[str, Path]) -> None:  # noqa: F811
    write_clip(webui["clip"] / "sub" / "long.safetensors", kind="long-clip-l", positions=248)
    generate([{"clip_skip": 1, "clip_l": "sub/long.safetensors (Long-CLIP-L · 248)"}])
    assert applied(host) == Selection(1, "both", {"clip_l": SlotChoice("sub/long.safetensors")})


def test_clip_skip_one_is_written_and_scope_only_when_not_both(host: FakeHost) -> None:
    host.model_family = "sdxl"
    p = generate([False, 1, "CLIP-L only"])
    assert p.extra_generation_params["Clip skip"] == 1  # A1111 itself would omit 1
    assert p.extra_generation_params["Clip skip scope"] == "CLIP-L only"


def test_global_options_apply_under_a_neutral_panel(host: FakeHost, webui: dict[str, Path]) -> None:  # noqa: F811
    from modules import shared

    write_clip(webui["clip"] / "g.safetensors")
    shared.opts.set("te_switch_clip_skip", "3")
    shared.opts.set("te_switch_encoder_clip_l", "g.safetensors")
    generate(NEUTRAL)
    assert applied(host) == Selection(3, "both", {"clip_l": SlotChoice("g.safetensors")})
    host.calls.clear()
    generate([False, 2, "both"])  # the tab's own N wins over the option's
    assert applied(host).clip_skip == 2
    assert applied(host).slot("clip_l").encoder == "g.safetensors"


def test_override_settings_per_request_and_restored(host: FakeHost) -> None:
    from modules import shared

    generate(NEUTRAL, override={"te_switch_clip_skip": "2", "te_switch_precision_clip_l": "fp16"})
    assert applied(host) == Selection(2, "both", {"clip_l": SlotChoice(None, "fp16")})
    assert shared.opts.te_switch_clip_skip == 0  # restored afterwards (the default is in opts.data)


def test_xyz_values_win_even_auto(host: FakeHost, webui: dict[str, Path]) -> None:  # noqa: F811
    write_clip(webui["clip"] / "a.safetensors")
    generate([False, 2, "both", "a.safetensors"], xyz={"clip_skip": "Auto", "clip_l": "Built-in"})
    assert applied(host) == Selection()
    host.calls.clear()
    generate(NEUTRAL, xyz={"clip_skip": 5})
    assert applied(host).clip_skip == 5


def test_slots_the_model_lacks_are_ignored(host: FakeHost, webui: dict[str, Path]) -> None:  # noqa: F811
    write_clip(webui["clip"] / "g.safetensors", kind="clip-g")
    p = generate([True, 1, "both", "Built-in", "Auto", "g.safetensors", "Auto"])
    assert applied(host).slots == {}  # SD1 has no CLIP-G
    assert "TE CLIP-G" not in p.extra_generation_params


def test_xyz_cells_do_not_share_infotext(host: FakeHost, webui: dict[str, Path]) -> None:  # noqa: F811
    from modules import processing

    write_clip(webui["clip"] / "a.safetensors")
    parent = processing.StableDiffusionProcessingTxt2Img(prompt="x")
    shared_params = parent.extra_generation_params
    from te_switch.webui import infotext, sources

    cell = __import__("copy").copy(parent)
    infotext.write(cell, sources.resolve(Selection(2, "both", {"clip_l": SlotChoice("a.safetensors")})))
    assert shared_params == {}  # X/Y/Z copies p shallowly: the parent's dict must stay clean
    assert cell.extra_generation_params["Clip skip"] == 2
    infotext.write(cell, sources.resolve(Selection()))
    assert cell.extra_generation_params == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([False, 2, "both", "nowhere.safetensors"], "nowhere.safetensors: no such encoder in the encoder folders"),
        ([{"clip_skip": 2, "cilp_l": "x"}], "unknown key 'cilp_l'"),
        ([True, 1, "both", "../outside.safetensors"], "outside the encoder folders"),
    ],
)
def test_bad_request_stops_the_generation(host: FakeHost, args: list[Any], message: str) -> None:
    from modules import shared

    from te_switch.webui import runtime

    p = generate(args)
    assert shared.state.interrupted
    assert p.result.images == []
    assert "apply" not in host.names()
    comment = next(iter(p.comments))
    assert message in comment
    assert "\n" not in comment
    assert message in runtime.status_line()[0]


def test_failed_swap_stops_and_ends(host: FakeHost, webui: dict[str, Path]) -> None:  # noqa: F811
    from modules import shared

    from te_switch.webui import runtime

    write_clip(webui["clip"] / "a.safetensors")
    host.fail_with = engine_failure()
    p = generate([True, 1, "both", "a.safetensors"])
    assert shared.state.interrupted
    assert p.result.images == []
    assert host.names() == ["apply", "end"]
    assert "needs [77, 768]" in runtime.status_line()[0]
    assert runtime.status_line()[1] is True
    # the next good generation clears the error
    shared.state.begin()
    host.fail_with = None
    generate(NEUTRAL)
    assert runtime.last_error() is None


def test_end_runs_when_the_generation_raises(host: FakeHost) -> None:
    from modules import errors

    from te_switch.webui import entry

    entry.patch_close()
    try:
        with pytest.raises(RuntimeError, match="sampler exploded"):
            generate([False, 2], raise_after_process=True)
    finally:
        entry.unpatch_close()
    assert host.names() == ["apply", "begin", "end"]  # postprocess never ran; close() ended it
    assert not errors.reported


def test_close_patch_is_idempotent_and_undone(host: FakeHost) -> None:
    from modules import processing

    from te_switch.webui import entry

    original = processing.StableDiffusionProcessing.close
    entry.patch_close()
    entry.patch_close()
    assert processing.StableDiffusionProcessing.close is not original
    entry.unpatch_close()
    assert processing.StableDiffusionProcessing.close is original


def test_no_supported_host(webui: dict[str, Path]) -> None:  # noqa: F811
    from modules import shared

    from te_switch.webui import options

    options.register()
    use_host(None)
    p = generate(NEUTRAL)
    assert not shared.state.interrupted
    assert p.result.images == ["image-0"]
    p = generate([False, 2])
    assert shared.state.interrupted
    assert "need A1111 1.10, Forge 2, reForge or Forge Classic" in next(iter(p.comments))


def test_per_checkpoint_memory(host: FakeHost, webui: dict[str, Path]) -> None:  # noqa: F811
    from modules import shared

    from te_switch.webui import runtime

    write_clip(webui["clip"] / "a.safetensors")
    generate([False, 2, "both", "a.safetensors"])
    assert runtime.remembered_panel() is None  # off by default
    shared.opts.set("te_switch_per_checkpoint", True)
    generate([False, 2, "both", "a.safetensors"])
    stored = json.loads((webui["cache"] / "checkpoints.json").read_text())
    assert stored["checkpoints"]["model-a.safetensors"]["hash"] == "abcdef0123"
    assert runtime.remembered_panel() == Selection(2, "both", {"clip_l": SlotChoice("a.safetensors")})
    generate(NEUTRAL, xyz={"clip_skip": 4})  # X/Y/Z cells are not "what the user chose"
    assert runtime.remembered_panel().clip_skip == 2


def test_nested_generation_hands_the_model_back(host: FakeHost, webui: dict[str, Path]) -> None:  # noqa: F811
    """ADetailer-style: a generation inside another one (our script included in the inner p)."""
    from modules import processing, shared

    from te_switch.webui import script

    write_clip(webui["clip"] / "a.safetensors")
    outer = processing.StableDiffusionProcessingTxt2Img(prompt="outer")
    inner = processing.StableDiffusionProcessingImg2Img(prompt="inner")
    script.start(outer, (False, 2, "both", "a.safetensors"))
    outer_sel = host.active
    script.start(inner, (False, 5))
    assert host.active.clip_skip == 5
    script.finish(inner)
    assert host.active == outer_sel  # the outer batch goes on with its own encoder and layer
    assert applied_last(host) == outer_sel
    script.finish(outer)
    assert host.active is None
    # a run left open by a crashed job is not an "outer" run of the next job
    dangling = processing.StableDiffusionProcessingTxt2Img(prompt="crashed")
    script.start(dangling, (False, 3))
    shared.state.begin()
    fresh = processing.StableDiffusionProcessingTxt2Img(prompt="next job")
    script.start(fresh, (False, 4))
    script.finish(fresh)
    assert host.active is None


def applied_last(host: FakeHost) -> Selection:
    return [sel for name, sel in host.calls if name == "apply"][-1]
