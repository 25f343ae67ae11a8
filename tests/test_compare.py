"""``python -m te_switch compare`` on the demo: the grid, its text chunks, and its errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

from PIL import Image

from te_switch.core import infotext
from te_switch.core.infotext import format_infotext, parse_infotext
from te_switch.core.selection import ALL_SLOTS, SCOPE_LABELS, Selection, SlotChoice, parse_clip_skip
from te_switch.standalone import cli, demo
from te_switch.standalone.compare import GRID_KEY

PROMPT = 'a "quoted" cat, sitting: on a mat'
NEGATIVE = "blurry, dark"


@pytest.fixture
def cache(demo_root: demo.Demo, monkeypatch: pytest.MonkeyPatch) -> str:
    root = os.path.dirname(demo_root.root)
    monkeypatch.setenv("TE_SWITCH_CACHE", root)
    return root


@pytest.fixture(scope="module")
def grid(demo_root: demo.Demo, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """One compare run: Built-in → file → Built-in rows (the last row follows a swap and a restore, so its
    cells repeat the first row's settings exactly), clip skip Auto/3, two seeds."""
    out = tmp_path_factory.mktemp("compare") / "grid.png"
    mp = pytest.MonkeyPatch()
    mp.setenv("TE_SWITCH_CACHE", os.path.dirname(demo_root.root))
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main([
            "compare", "--prompt", PROMPT, "--negative", NEGATIVE,
            "--encoders", "Built-in,clip-l-alt.safetensors,Built-in",
            "--clip-skip", "auto,3", "--seeds", "7,8", "--steps", "2", "--size", "64", "--out", str(out),
        ])  # fmt: skip
    mp.undo()
    assert code == 0, stderr.getvalue()
    return out, stdout.getvalue(), stderr.getvalue()


def read_grid(path: str) -> dict:
    """The grid document of the PNG, each cell with its infotext parsed back (``params``)."""
    with Image.open(path) as image:
        doc = json.loads(image.text[GRID_KEY])  # type: ignore[attr-defined]
    for cell in doc["cells"]:
        cell["params"] = parse_infotext(cell["infotext"])
    return doc


def selection_from_params(params: dict) -> Selection:
    """The Selection an infotext describes (encoder names without their hash), read with the core codec."""
    slots = {}
    for slot in ALL_SLOTS:
        encoder = params.get(infotext.encoder_key(slot))
        precision = params.get(infotext.precision_key(slot), "auto")
        if encoder is not None or precision != "auto":
            name = infotext.split_encoder_value(str(encoder))[0] if encoder else None
            slots[slot] = SlotChoice(name, str(precision))
    scope = next((s for s, label in SCOPE_LABELS.items() if params.get(infotext.SCOPE) == label), "both")
    return Selection(parse_clip_skip(params.get(infotext.CLIP_SKIP)), scope, slots)


def cell_pixels(path: Path, doc: dict) -> dict[tuple[int, int], np.ndarray]:
    image = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
    out = {}
    for cell in doc["cells"]:
        x, y, w, h = cell["box"]
        out[cell["row"], cell["col"]] = image[y : y + h, x : x + w]
    return out


def test_grid_cells_differ_exactly_where_settings_differ(grid: tuple[Path, str, str]) -> None:
    path, _, _ = grid
    doc = read_grid(str(path))
    assert len(doc["rows"]) == 3
    assert len(doc["columns"]) == 4
    pixels = cell_pixels(path, doc)
    settings = {}
    for cell in doc["cells"]:
        p = cell["params"]
        settings[cell["row"], cell["col"]] = (p.get("TE CLIP-L"), p.get("Clip skip"), p["Seed"])
    for a in settings:
        for b in settings:
            if a < b:
                same = np.array_equal(pixels[a], pixels[b])
                assert same == (settings[a] == settings[b]), (a, b, settings[a], settings[b])


def test_png_text_chunks_round_trip_every_cells_settings(grid: tuple[Path, str, str]) -> None:
    path, _, _ = grid
    doc = read_grid(str(path))
    expected = {}
    encoders = [None, "clip-l-alt.safetensors", None]
    skips = [None, 3] * 2
    for r, encoder in enumerate(encoders):
        for c, skip in enumerate(skips):
            expected[r, c] = Selection(skip, slots={"clip_l": SlotChoice(encoder)} if encoder else {})
    for cell in doc["cells"]:
        params = cell["params"]
        assert params["Prompt"] == PROMPT
        assert params["Negative prompt"] == NEGATIVE
        assert (params["Seed"], params["Steps"], params["Size"]) == (7 + cell["col"] // 2, 2, "64x64")
        assert params["Model"] == demo.DEMO_MODEL_NAME
        assert selection_from_params(params) == expected[cell["row"], cell["col"]]
        assert set(cell["timings"]) == {"swap", "encode", "generate"}
        assert all(v >= 0 for v in cell["timings"].values())
    with Image.open(path) as image:
        assert image.text["parameters"] == doc["cells"][0]["infotext"]  # what PNG Info shows
    assert "draws noise" in doc["note"]


def test_compare_prints_timings_and_progress(grid: tuple[Path, str, str]) -> None:
    _, stdout, stderr = grid
    lines = stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["cell", "encoder", "clip", "skip"]
    assert len(lines) == 1 + 12 + 1
    assert lines[-1].endswith("s")
    assert "12 images" in lines[-1]
    assert "[" in stderr
    assert "12/12" in stderr
    assert "draws noise" in stderr  # the demo says what it is


def test_bad_encoder_file_is_one_line_and_non_zero(cache: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\xff\xff\xff\xff\xff\xff\xff\x7f not a safetensors file")
    for encoders, words in ((f"Built-in,{bad}", "broken.safetensors"), ("nope.safetensors", "no such encoder")):
        code = cli.main(["compare", "--prompt", "x", "--encoders", encoders, "--out", str(tmp_path / "g.png")])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 1
        assert len(lines) == 1
        assert words in lines[0]
        assert "Traceback" not in err
        assert not (tmp_path / "g.png").exists()


def test_bad_axis_values_are_one_line_errors(cache: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["compare", "--prompt", "x", "--clip-skip", "auto,13", "--out", str(tmp_path / "g.png")])
    assert code == 1
    assert "clip skip must be 1..12" in capsys.readouterr().err


def test_infotext_round_trip_with_awkward_values() -> None:
    params = {
        "Prompt": 'multi\nline, "quoted": prompt',
        "Negative prompt": "a, b",
        "Steps": 20,
        "Seed": 3,
        "Clip skip": 2,
        "Clip skip scope": "CLIP-G only",
        "TE CLIP-L": "sub dir/long, clip.safetensors [0123456789]",
        "TE CLIP-G precision": "fp32",
    }
    parsed = parse_infotext(format_infotext(params))
    assert parsed == params
    selection = selection_from_params(parsed)
    assert selection.clip_skip == 2
    assert selection.scope == "clip_g"
    assert selection.slot("clip_l").encoder == "sub dir/long, clip.safetensors"
    assert selection.slot("clip_g").precision == "fp32"


def test_infotext_keys_match_the_webui_side() -> None:
    webui_infotext = pytest.importorskip("te_switch.webui.infotext")
    selection = Selection(2, "clip_l", {"clip_l": SlotChoice(None, "fp16")})
    sources = pytest.importorskip("te_switch.webui.sources")
    entries = webui_infotext.entries(sources.resolve(selection))
    ours = parse_infotext(format_infotext({"Prompt": "p", "Steps": 1, "Seed": 1, **entries}))
    assert selection_from_params(ours) == selection


# ---------------------------------------------------------------------------------------------
# distinct columns, and the page's PNG


def test_default_columns_are_distinct_settings(cache: str) -> None:
    from te_switch.standalone.compare import DEFAULT_CLIP_SKIPS, distinct_clip_skips
    from te_switch.standalone.model import open_model

    model = open_model()
    # SD1: Auto is layer 12/12 with the final norm, exactly what 1 is: 1 is dropped, not 2 or 3
    assert distinct_clip_skips(model.adapter, DEFAULT_CLIP_SKIPS) == [None, 2, 3]


def test_a_column_identical_by_construction_is_labelled_not_rendered(cache: str, tmp_path: Path) -> None:
    out = tmp_path / "g.png"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main([
            "compare", "--prompt", "x", "--encoders", "Built-in", "--clip-skip", "auto,1,2", "--seeds", "4,5",
            "--steps", "2", "--size", "64", "--out", str(out),
        ])  # fmt: skip
    assert code == 0
    doc = read_grid(str(out))
    assert "same layers, not rendered again" in doc["columns"][1]
    assert "= Clip skip Auto" in doc["columns"][4]  # seed 5's "1" column repeats seed 5's Auto, not seed 4's
    assert [c["same_as_col"] for c in doc["cells"]] == [None, 0, None, None, 3, None]
    pixels = cell_pixels(out, doc)
    assert np.array_equal(pixels[(0, 1)], pixels[(0, 0)])
    assert np.array_equal(pixels[(0, 4)], pixels[(0, 3)])
    assert not np.array_equal(pixels[(0, 2)], pixels[(0, 0)])
    assert "4 images rendered (the rest identical)" in stdout.getvalue()


def test_the_page_serves_the_png_compare_writes(cache: str, tmp_path: Path) -> None:
    """Same settings, same bytes: the page's file is lossless, carries its infotext, and is what compare writes."""
    from te_switch.standalone.model import open_model
    from te_switch.standalone.page import LocalBackend
    from te_switch.webui.args import args_from_selection

    out = tmp_path / "one.png"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main([
            "compare", "--prompt", PROMPT, "--negative", NEGATIVE, "--encoders", "clip-l-alt.safetensors",
            "--clip-skip", "2", "--seeds", "9", "--steps", "2", "--size", "64", "--guidance", "7", "--out", str(out),
        ])  # fmt: skip
    assert code == 0
    local = LocalBackend(open_model(), outputs=str(tmp_path / "page"))
    selection = Selection(clip_skip=2, slots={"clip_l": SlotChoice("clip-l-alt.safetensors")})
    served, text, status = local.generate(PROMPT, NEGATIVE, 9, 2, 64, 7.0, *args_from_selection(selection))
    assert not status.startswith("error"), status
    assert served.endswith(".png")
    assert Path(served).read_bytes() == out.read_bytes()
    with Image.open(served) as image:
        assert image.format == "PNG"
        assert image.text["parameters"] == text  # type: ignore[attr-defined]
    assert parse_infotext(text)["Clip skip"] == 2
