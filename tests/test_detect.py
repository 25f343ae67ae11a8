"""core.detect: what a file holds, from keys and shapes only (real-shape headers, sparse data)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import filemakers as fm
import pytest
import torch

from te_switch.core import readers
from te_switch.core.detect import T5_KINDS, detect, inspect_path
from te_switch.core.layouts import LAYOUTS, layout_of
from te_switch.core.readers import open_file

TEXT_KINDS = {"clip-l", "long-clip-l", "clip-h", "clip-g", "t5-xxl", "t5-xl", "t5-base", "umt5-xxl"}


def check_tower(got: object, want: fm.Expect, path: Path) -> None:
    """Compare one TowerInfo with its expectation, field by field, with a readable message."""
    where = f"{path.name} tower {want.tower or want.kind}"
    assert got.kind == want.kind, f"{where}: kind {got.kind!r} ({got.note})"
    assert got.error is None, f"{where}: {got.error}"
    assert got.tower == want.tower, f"{where}: tower slot {got.tower!r}"
    for name in ("layout", "prefix", "layers", "width", "positions", "vocab"):
        value = getattr(want, name)
        if value is not None:
            assert getattr(got, name) == value, f"{where}: {name} {getattr(got, name)!r} != {value!r}"
    if want.dtypes is not None:
        got_dtypes = list(got.dtypes)
        assert got_dtypes == sorted(got_dtypes), f"{where}: dtypes not sorted {got_dtypes}"
        core = [d for d in got_dtypes if d not in want.dtypes_extra or d in want.dtypes]
        assert core == list(want.dtypes), f"{where}: dtypes {got_dtypes} != {list(want.dtypes)}"
    if want.params is not None:
        allowed = {want.params, *want.params_alt}
        assert got.params in allowed, f"{where}: params {got.params} not in {sorted(allowed)}"
    if want.check_quant:
        assert got.quant == want.quant, f"{where}: quant {got.quant!r} != {want.quant!r}"
    feats = set(got.features)
    assert want.features <= feats, f"{where}: features {sorted(feats)} lack {sorted(want.features - feats)}"
    assert not (want.no_features & feats), f"{where}: unexpected features {sorted(want.no_features & feats)}"
    if want.kind in ("not-a-text-encoder", "unknown"):
        assert got.note, f"{where}: {want.kind} without a note saying why"


def check_file(path: Path, case: fm.Case) -> None:
    with open_file(path) as src:
        assert src.format == case.fmt
        towers = detect(src)
    assert isinstance(towers, list)
    assert towers, "detect must return at least one entry"
    assert len(towers) == len(case.towers), [(t.tower, t.kind, t.prefix) for t in towers]
    if len(case.towers) == 1:
        pairs = [(towers[0], case.towers[0])]
    else:
        by_slot = {t.tower: t for t in towers}
        assert set(by_slot) == {w.tower for w in case.towers}, sorted(map(str, by_slot))
        pairs = [(by_slot[w.tower], w) for w in case.towers]
    for got, want in pairs:
        check_tower(got, want, path)
        assert got.path == src.path
        assert got.format == case.fmt


@pytest.mark.parametrize("name", list(fm.CATALOGUE))
def test_detect_catalogue(make_case: Callable[[str], Path], name: str) -> None:
    check_file(make_case(name), fm.CATALOGUE[name])


@pytest.mark.parametrize("name", list(fm.CATALOGUE))
def test_inspect_path_equals_detect(make_case: Callable[[str], Path], name: str) -> None:
    path = make_case(name)
    with open_file(path) as src:
        direct = [(t.tower, t.kind, t.layout, t.prefix, t.params, list(t.dtypes)) for t in detect(src)]
    via_path = [(t.tower, t.kind, t.layout, t.prefix, t.params, list(t.dtypes)) for t in inspect_path(str(path))]
    assert via_path == direct


# the name says one thing, the content another: content wins (extensions included)
MISLEADING = {
    "t5xxl-bf16": "clip_l.safetensors",
    "hf-clip-l": "t5xxl_fp16.safetensors",
    "openclip-bigg-bin": "clip_l.pt",
    "hf-clip-g": "longclip-L.safetensors",
    "hf-longclip": "ViT-L-14-TEXT-detail-improved-hiT-GmP-TE-only-HF.safetensors",
    "umt5-xxl": "t5xxl_fp8_e4m3fn.safetensors",
    "t5xxl-fp8-e4m3fn": "umt5_xxl.ckpt",
    "sdxl-checkpoint": "v1-5-pruned-emaonly.safetensors",
    "gmp-checkpoint-pt": "clip_g.sft",
    "lora-peft": "clip_l.safetensors",
    "vae": "text_encoder.safetensors",
    "ti-sdxl": "clip_g.safetensors",
    "clip-b": "clip_l.safetensors",
    "t5xxl-gguf-q8_0": "clip_l.safetensors",
}


@pytest.mark.parametrize("name", list(MISLEADING))
def test_detection_ignores_file_names(make_case: Callable[[str], Path], tmp_path: Path, name: str) -> None:
    path = make_case(name)
    renamed = tmp_path / "renamed" / MISLEADING[name]
    renamed.parent.mkdir()
    shutil.move(path, renamed)
    check_file(renamed, fm.CATALOGUE[name])


def test_every_kind_is_covered() -> None:
    kinds = {w.kind for c in fm.CATALOGUE.values() for w in c.towers}
    assert kinds == TEXT_KINDS | {"not-a-text-encoder", "unknown"}


def test_every_layout_has_a_fixture() -> None:
    """A layout is one registry entry (core/layouts.py) plus its fixture: the catalogue must hold one."""
    covered = {
        (w.layout, "t5" if w.kind in T5_KINDS else "clip") for c in fm.CATALOGUE.values() for w in c.towers if w.layout
    }
    written_with_gguf = {("llama.cpp", "t5")}  # test_detect_gguf_t5 (writing GGUF needs the gguf package)
    assert {(layout.name, layout.family) for layout in LAYOUTS} == covered | written_with_gguf
    assert layout_of("hf", "t5").family == "t5"
    with pytest.raises(ValueError, match="unknown layout"):
        layout_of("diffusers-flat", "clip")


def test_sharded_index_file_and_folder_agree(make_case: Callable[[str], Path]) -> None:
    folder = make_case("t5xxl-sharded-safetensors")
    index = folder / "model.safetensors.index.json"
    a = inspect_path(str(folder))
    b = inspect_path(str(index))
    assert [(t.kind, t.params, t.layers) for t in a] == [(t.kind, t.params, t.layers) for t in b]
    assert a[0].kind == "t5-xxl"


@pytest.mark.parametrize(
    "name",
    [
        "sd3-bundle",
        "openai-clip-l-pt",
        "gmp-checkpoint-pt",
        "t5xxl-sharded-bin",
        "t5xxl-scaled-fp8-input",
        "longclip-original-safetensors",
        "umt5-xxl-gguf-q4_k",
        "vae",
    ],
)
def test_detect_reads_headers_only(
    make_case: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Detection answers from keys and shapes: no tensor data is loaded (a library scan stays cheap)."""

    def refuse(self: object, key: str) -> None:
        raise AssertionError(f"detect loaded tensor data: {key}")

    from te_switch.core.gguf_reader import GGUFSource

    for cls in (readers.SafetensorsSource, readers.PickleSource, readers.ShardedSource, GGUFSource):
        monkeypatch.setattr(cls, "load", refuse)
    check_file(make_case(name), fm.CATALOGUE[name])


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_detection_ignores_a_broken_decoder_shard(make_case: Callable[[str], Path], fmt: str) -> None:
    """Only the encoder's shards are read: a missing or corrupt decoder shard does not matter."""
    folder = make_case(f"t5xxl-sharded-{fmt}")
    ext = "safetensors" if fmt == "safetensors" else "bin"
    prefix = "model" if fmt == "safetensors" else "pytorch_model"
    (folder / f"{prefix}-00002-of-00002.{ext}").write_bytes(b"\x00garbage")
    check_file(folder, fm.CATALOGUE[f"t5xxl-sharded-{fmt}"])
    (folder / f"{prefix}-00002-of-00002.{ext}").unlink()
    check_file(folder, fm.CATALOGUE[f"t5xxl-sharded-{fmt}"])


def test_detect_scaled_fp8_marker_without_input_scales(tmp_path: Path) -> None:
    """The ``scaled_fp8`` marker alone (every layer's scale present) is enough for 'scaled-fp8'."""
    spec = {"scaled_fp8": ((0,), "F8_E4M3"), **fm.t5_spec(*fm.T5_XXL, dtype="F16", linear_dtype="F8_E4M3")}
    for k, (_, dt) in list(spec.items()):
        if dt == "F8_E4M3" and k != "scaled_fp8":
            spec[k.removesuffix(".weight") + ".scale_weight"] = ((), "F32")
    path = fm.write_sparse_safetensors(tmp_path / "t5.safetensors", spec)
    (tower,) = inspect_path(str(path))
    assert (tower.kind, tower.quant) == ("t5-xxl", "scaled-fp8")


@pytest.mark.parametrize(
    ("spec_fn", "kind"),
    [
        (lambda: fm.hf_clip_spec(768, 11), "unknown"),  # a pruned CLIP-L is not CLIP-L
        (lambda: fm.hf_clip_spec(768, 12, positions=154), "unknown"),
        (lambda: fm.openclip_spec(1280, 31, proj=1280), "unknown"),
        (lambda: fm.hf_clip_spec(512, 12, proj=512, positions=248), "unknown"),  # Long-CLIP-B
    ],
)
def test_kind_from_shapes_edge_cases(tmp_path: Path, spec_fn: Callable[[], fm.Spec], kind: str) -> None:
    path = fm.write_sparse_safetensors(tmp_path / "x.safetensors", spec_fn())
    (tower,) = inspect_path(str(path))
    assert tower.kind == kind, tower.note
    if kind == "unknown":
        assert tower.note


def test_tensorless_and_unrelated_files(tmp_path: Path) -> None:
    empty = fm.save_safetensors(tmp_path / "empty.safetensors", {})
    (t,) = inspect_path(str(empty))
    assert t.kind in ("unknown", "not-a-text-encoder")
    assert t.note
    assert t.error is None
    odd = fm.save_safetensors(tmp_path / "odd.safetensors", {"foo.bar": torch.ones(3)})
    (t,) = inspect_path(str(odd))
    assert t.kind in ("unknown", "not-a-text-encoder")
    assert t.note


def test_inspect_path_never_raises(tmp_path: Path) -> None:
    from test_readers import _bad_blobs

    for case, blob in _bad_blobs().items():
        if case.startswith("gguf"):
            continue  # its own test below
        path = tmp_path / f"{case}.safetensors"
        path.write_bytes(blob)
        towers = inspect_path(str(path))
        assert len(towers) == 1, case
        err = towers[0].error
        assert err, case
        assert "\n" not in err, (case, err)
        assert path.name in err, (case, err)
        assert towers[0].kind not in TEXT_KINDS
    marker = tmp_path / "PWNED"
    hostile = fm.hostile_pickle(tmp_path / "evil.pt", marker)
    (t,) = inspect_path(str(hostile))
    assert t.error
    assert not marker.exists()
    (t,) = inspect_path(str(tmp_path / "missing.safetensors"))
    assert t.error
    assert "missing.safetensors" in t.error
    (t,) = inspect_path(str(tmp_path))  # a folder of many files
    assert t.error
    assert "\n" not in t.error


def test_inspect_path_never_raises_on_broken_gguf(tmp_path: Path) -> None:
    """A .gguf in the folder must not break a scan, whether or not the GGUF reader / gguf package is there."""
    path = tmp_path / "t5-Q8_0.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    (t,) = inspect_path(str(path))
    assert t.error
    assert "\n" not in t.error
    assert path.name in t.error


# ---------------------------------------------------------------------------------------------
# GGUF (llama.cpp T5 names), written with tests/synth_gguf.py from names gguf-py itself maps


def test_detect_gguf_t5(tmp_path: Path) -> None:
    pytest.importorskip("te_switch.core.gguf_reader", reason="core.gguf_reader not written yet")
    from synth_gguf import write_gguf

    d, ff, layers, heads = 64, 128, 3, 4
    sd = {k: torch.randn(s) * 0.1 for k, (s, _) in fm.t5_spec(d, ff, layers, heads, vocab=fm.T5_VOCAB).items()}
    path = tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf"
    write_gguf(path, fm.hf_t5_to_gguf_names(sd), "Q8_0", arch="t5encoder")
    (tower,) = inspect_path(str(path))
    assert tower.error is None, tower.error
    assert (tower.layout, tower.format, tower.quant) == ("llama.cpp", "gguf", "gguf")
    assert (tower.layers, tower.width, tower.vocab) == (layers, d, fm.T5_VOCAB)
    assert tower.params == fm.spec_params(fm.t5_spec(d, ff, layers, heads))
