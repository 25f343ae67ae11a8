"""The recommendation in the WebUI: the host's LoRA lookup, the panel's line, per-model memory first, the
automatic mode through a whole (fake) generation, X/Y/Z cells, the API, the infotext, Japanese."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_recommend import civitai_info, lora_file, write_json
from test_webui_script import NEUTRAL, applied, generate
from test_webui_support import FakeHost, use_host, webui  # noqa: F401 - fixture

from te_switch.core.selection import Selection


@pytest.fixture
def loras(webui: dict[str, Path]) -> Path:  # noqa: F811
    """models/Lora with an SD1 LoRA trained at clip skip 2 and one without any clip-skip information."""
    from modules import shared

    folder = webui["models"] / "Lora"
    lora_file(folder / "anime_style.safetensors", {"ss_clip_skip": "2", "ss_base_model_version": "sd_v1",
                                                    "ss_output_name": "animeStyle"})  # fmt: skip
    lora_file(folder / "plain.safetensors", {"ss_network_dim": "8"})
    shared.cmd_opts.lora_dir = str(folder)
    return folder


@pytest.fixture
def host(webui: dict[str, Path], loras: Path) -> FakeHost:  # noqa: F811
    from te_switch.webui import options

    options.register()
    fake = FakeHost("sd1")
    fake.model.sd_checkpoint_info.filename = str(webui["models"] / "Stable-diffusion" / "model-a.safetensors")
    use_host(fake)
    return fake


def with_networks() -> Any:
    """The host's Lora extension, loaded (as the WebUI has it in ``sys.modules``)."""
    import networks

    networks.list_available_networks()
    return networks


def panel_lines(prompt: str, sel: Selection | None = None) -> tuple[list[str], int | None]:
    from te_switch.webui import recommend

    sel = sel or Selection()
    advice = recommend.advice_for([prompt])
    return recommend.lines(advice, recommend.current_clip_skip(sel), auto=sel.clip_skip is None)


def test_panel_line_for_a_lora_trained_at_2(host: FakeHost) -> None:
    assert panel_lines("1girl <lora:anime_style:0.8>") == (
        ["This LoRA was trained with Clip skip 2 (from its file) · you use 1"],
        2,
    )
    assert panel_lines("1girl <lora:anime_style:0.8>", Selection(2)) == (
        ["This LoRA was trained with Clip skip 2 (from its file) · you use 2"],
        None,  # nothing to offer
    )
    assert panel_lines("1girl <lora:plain:1>") == ([], None)  # no information: nothing said
    assert panel_lines("no lora") == ([], None)


def test_host_lookup_by_alias_and_forbidden_aliases(host: FakeHost, loras: Path) -> None:
    from te_switch.webui import recommend

    with_networks()
    assert recommend.lora_path("animeStyle") == str(loras / "anime_style.safetensors")  # ss_output_name
    assert recommend.lora_path("anime_style") == str(loras / "anime_style.safetensors")
    lora_file(loras / "sub" / "copy.safetensors", {"ss_output_name": "animeStyle"})
    with_networks()  # two files claim one alias: the host then takes names only
    assert recommend.lora_path("animeStyle") is None
    assert recommend.lora_path("copy") == str(loras / "sub" / "copy.safetensors")
    assert recommend.lora_path("missing") is None


def test_the_hosts_added_network_counts(host: FakeHost) -> None:
    from modules import shared

    with_networks()
    shared.opts.set("sd_lora", "anime_style")
    lines, offer = panel_lines("1girl")
    assert offer == 2
    assert "This LoRA was trained with Clip skip 2" in lines[0]


def test_conflict_is_shown_not_resolved(host: FakeHost, webui: dict[str, Path]) -> None:  # noqa: F811
    checkpoint = Path(host.model.sd_checkpoint_info.filename)
    checkpoint.parent.mkdir(parents=True)
    write_json(checkpoint.with_suffix(".civitai.info"), civitai_info(1, 1, 2))
    lines, offer = panel_lines("<lora:anime_style:1>")
    assert lines == [
        "This checkpoint recommends Clip skip 1 (2 of 3 sample images)",
        "LoRA “anime_style” was trained with Clip skip 2 (from its file)",
        "⚠ The models disagree (the checkpoint: 1, LoRA “anime_style”: 2). Choose the clip skip yourself; "
        "Auto does not pick one. · you use 1",
    ]
    assert offer is None


def test_own_setting_comes_first(host: FakeHost) -> None:
    from modules import shared

    shared.opts.set("te_switch_per_checkpoint", True)
    generate([False, 3], prompt="<lora:anime_style:1>")  # the user generated with 3: remembered for the LoRA
    lines, offer = panel_lines("<lora:anime_style:1>")
    assert lines == [
        "This checkpoint: you used Clip skip 3 with it (remembered)",  # the panel memory, restored on load
        "LoRA “anime_style”: you used Clip skip 3 with it (remembered) · also: 2 (from its file) · you use 1",
    ]
    assert offer == 3
    generate(NEUTRAL, prompt="<lora:anime_style:1>", xyz={"clip_skip": 5})  # X/Y/Z cells are not a choice
    assert panel_lines("<lora:anime_style:1>")[1] == 3


def test_off_by_default_auto_stays_the_hosts(host: FakeHost) -> None:
    p = generate(NEUTRAL, prompt="1girl <lora:anime_style:1>")
    assert applied(host).clip_skip is None
    assert "Clip skip" not in p.extra_generation_params


def test_automatic_mode_is_explicit_2(host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    """Auto + the automatic mode gives the model exactly what an explicit clip skip 2 gives it."""
    from modules import shared

    explicit = generate([False, 2], prompt="1girl <lora:anime_style:1>")
    explicit_sel = applied(host)
    host.calls.clear()
    shared.opts.set("te_switch_auto_recommended", True)
    auto = generate(NEUTRAL, prompt="1girl <lora:anime_style:1>")
    assert applied(host) == explicit_sel == Selection(2)
    assert auto.extra_generation_params["Clip skip"] == explicit.extra_generation_params["Clip skip"] == 2
    assert "Auto: Clip skip 2, as LoRA “anime_style” recommend" in capsys.readouterr().out
    # an explicit value (tab, global option, X/Y/Z) still wins
    generate([False, 1], prompt="<lora:anime_style:1>")
    assert applied_last(host).clip_skip == 1
    generate(NEUTRAL, prompt="<lora:anime_style:1>", override={"te_switch_clip_skip": 4})
    assert applied_last(host).clip_skip == 4
    # the panel says what Auto will do
    lines, offer = panel_lines("<lora:anime_style:1>")
    assert lines[-1] == "Auto uses Clip skip 2 (Settings: Auto follows the recommendation)."
    assert offer is None


def test_automatic_mode_with_a_conflict_keeps_the_hosts(host: FakeHost) -> None:
    from modules import shared

    checkpoint = Path(host.model.sd_checkpoint_info.filename)
    checkpoint.parent.mkdir(parents=True)
    write_json(checkpoint.with_suffix(".json"), {"notes": "Clip skip: 1"})
    shared.opts.set("te_switch_auto_recommended", True)
    p = generate(NEUTRAL, prompt="<lora:anime_style:1>")
    assert applied(host).clip_skip is None
    assert "Clip skip" not in p.extra_generation_params
    assert any("The models disagree (the checkpoint: 1, LoRA “anime_style”: 2)" in c for c in p.comments)


def test_xyz_cells_read_their_own_prompt_and_auto(host: FakeHost) -> None:
    """X/Y/Z "Prompt S/R" gives each cell its prompt; "[TE] CLIP Skip: Auto" means the recommendation."""
    from modules import shared

    shared.opts.set("te_switch_auto_recommended", True)
    cell_a = generate(NEUTRAL, prompt="1girl <lora:plain:1>", xyz={"clip_skip": "Auto"})
    assert applied_last(host).clip_skip is None
    assert "Clip skip" not in cell_a.extra_generation_params
    cell_b = generate(NEUTRAL, prompt="1girl <lora:anime_style:1>", xyz={"clip_skip": "Auto"})
    assert applied_last(host).clip_skip == 2
    assert cell_b.extra_generation_params["Clip skip"] == 2
    generate(NEUTRAL, prompt="1girl <lora:anime_style:1>", xyz={"clip_skip": "1"})
    assert applied_last(host).clip_skip == 1


def test_malformed_sidecar_never_costs_a_generation(
    host: FakeHost, loras: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from modules import shared

    (loras / "anime_style.civitai.info").write_text("{broken", encoding="utf-8")
    shared.opts.set("te_switch_auto_recommended", True)
    p = generate(NEUTRAL, prompt="<lora:anime_style:1>")
    assert p.result.images == ["image-0"]
    assert applied(host).clip_skip == 2  # the file still speaks
    generate(NEUTRAL, prompt="<lora:anime_style:1>")
    out = capsys.readouterr().out
    assert out.count("ignoring anime_style.civitai.info for clip skip: not JSON (line 1)") == 1


def test_api_route_and_api_generation(host: FakeHost) -> None:
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from modules import shared

    from te_switch.webui import api, script

    app = FastAPI()
    api.on_app_started(None, app)
    answer = TestClient(app).get("/te-switch/v1/recommend", params={"prompt": "<lora:anime_style:0.7>"}).json()
    assert answer["clip_skip"] == 2
    assert answer["conflict"] is False
    assert answer["family"] == "sd1"
    assert [(m["kind"], m["name"], m["clip_skip"]) for m in answer["models"]] == [
        ("checkpoint", "model-a.safetensors", None),
        ("lora", "anime_style", 2),
    ]
    assert answer["models"][1]["findings"] == [{"source": "file", "value": 2, "detail": ""}]
    # an API generation: alwayson_scripts args in the dict form, Auto
    from modules import processing

    shared.opts.set("te_switch_auto_recommended", True)
    p = processing.StableDiffusionProcessingTxt2Img(prompt="<lora:anime_style:1>")
    p.setup_prompts()
    script.start(p, ({"clip_skip": "Auto"},))
    assert host.active == Selection(2)
    assert p.extra_generation_params["Clip skip"] == 2
    script.finish(p)


def test_japanese(host: FakeHost) -> None:
    from modules import shared

    shared.opts.set("localization", "ja_JP")
    lines, offer = panel_lines("<lora:anime_style:1>")
    assert lines == ["このLoRAはCLIP Skip 2で学習されています（ファイルの情報） · 現在は1"]
    assert offer == 2


def applied_last(host: FakeHost) -> Selection:
    return [sel for name, sel in host.calls if name == "apply"][-1]


def test_memory_file_keeps_checkpoints_and_loras(host: FakeHost, webui: dict[str, Path]) -> None:  # noqa: F811
    from modules import shared

    shared.opts.set("te_switch_per_checkpoint", True)
    generate([False, 2], prompt="<lora:anime_style:1> <lora:plain:0.5>")
    stored = json.loads((webui["cache"] / "checkpoints.json").read_text())
    assert stored["version"] == 1
    assert stored["checkpoints"]["model-a.safetensors"]["selection"]["clip_skip"] == 2
    assert stored["loras"] == {"anime_style": {"clip_skip": 2}, "plain": {"clip_skip": 2}}
    generate(NEUTRAL, prompt="<lora:plain:1>")  # Auto is not a choice: nothing changes
    assert json.loads((webui["cache"] / "checkpoints.json").read_text())["loras"]["plain"] == {"clip_skip": 2}


def test_the_script_keeps_its_tabs_prompt_box(webui: dict[str, Path]) -> None:  # noqa: F811
    """``ScriptRunner.after_component`` hands every component of the tab to the script (A1111/Forge 1.10)."""
    from te_switch.webui.script import TESwitchScript

    script, prompt, other = TESwitchScript(), object(), object()
    script.after_component(other, elem_id="txt2img_neg_prompt")
    script.after_component(prompt, elem_id="txt2img_prompt")
    assert script.te_switch_prompt is prompt
