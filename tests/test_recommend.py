"""Clip-skip recommendations from a model's own files (``te_switch.core.recommend``): safetensors
metadata, A1111 user metadata, CivitAI sidecars, precedence, malformed files, prompts."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from te_switch.core import recommend
from te_switch.core.readers import SafetensorsSource
from te_switch.core.recommend import Finding, ModelAdvice, Reader, combine, lora_names


def lora_file(path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A small LoRA-shaped safetensors file with kohya-style metadata."""
    tensors = {
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 64),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 4),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def civitai_info(*clip_skips: object, key: str = "Clip skip") -> dict[str, object]:
    """A CivitAI model-version answer as Civitai Helper saves it (``<model>.civitai.info``)."""
    images = []
    for value in clip_skips:
        meta: dict[str, object] = {"prompt": "1girl", "Model": "x"}
        if value is not ...:
            meta[key] = value
        images.append({"url": "https://image.civitai.com/x.jpeg", "meta": meta})
    images.append({"url": "https://image.civitai.com/no-meta.jpeg", "meta": None})
    return {"id": 1, "baseModel": "SD 1.5", "images": images}


@pytest.fixture
def warnings() -> list[str]:
    return []


@pytest.fixture
def reader(warnings: list[str]) -> Reader:
    return Reader(on_warning=warnings.append)


# ---------------------------------------------------------------------------------------------
# the file's own metadata


def test_lora_with_ss_clip_skip(tmp_path: Path, reader: Reader, warnings: list[str]) -> None:
    path = lora_file(tmp_path / "anime.safetensors", {"ss_clip_skip": "2", "ss_base_model_version": "sd_v1"})
    advice = reader.advise("lora", "anime", str(path))
    assert advice.best == Finding("file", 2)
    assert advice.base == "sd1"
    assert warnings == []


@pytest.mark.parametrize(
    "metadata",
    [None, {"ss_clip_skip": "None", "ss_base_model_version": "sd_v1"}, {"ss_network_dim": "16"}],
    ids=["no-metadata", "ss_clip_skip-None", "other-keys"],
)
def test_files_without_information_say_nothing(
    tmp_path: Path, reader: Reader, warnings: list[str], metadata: dict[str, str] | None
) -> None:
    advice = reader.advise("lora", "plain", str(lora_file(tmp_path / "plain.safetensors", metadata)))
    assert advice.findings == ()
    assert warnings == []


def test_sdxl_training_has_no_clip_skip(tmp_path: Path, reader: Reader) -> None:
    """kohya's SDXL trainer ignores --clip_skip: the key says nothing about the LoRA."""
    path = lora_file(tmp_path / "xl.safetensors", {"ss_clip_skip": "2", "ss_base_model_version": "sdxl_base_v1-0"})
    advice = reader.advise("lora", "xl", str(path))
    assert advice.findings == ()
    assert advice.base == "sdxl"


@pytest.mark.parametrize(
    ("metadata", "family"),
    [
        ({"ss_base_model_version": "sd_v2_768_v"}, "sd2"),
        ({"ss_v2": "True"}, "sd2"),
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
        ({"ss_base_model_version": "flux1"}, "flux"),
        ({"ss_base_model_version": "sd3"}, "sd3"),
        ({"ss_base_model_version": "None"}, None),
    ],
)
def test_base_family(metadata: dict[str, str], family: str | None) -> None:
    assert recommend.base_family(metadata) == family


def test_malformed_metadata_is_one_warning_and_nothing_else(
    tmp_path: Path, reader: Reader, warnings: list[str]
) -> None:
    path = lora_file(tmp_path / "odd.safetensors", {"ss_clip_skip": "two", "ss_base_model_version": "sd_v1"})
    assert reader.advise("lora", "odd", str(path)).findings == ()
    assert warnings == ["ignoring odd.safetensors for clip skip: ss_clip_skip 'two' is not 1-12"]
    reader.advise("lora", "odd", str(path))
    assert len(warnings) == 1  # the same version of the file: said once


@pytest.mark.parametrize("damage", ["truncated", "not-json", "metadata-list"])
def test_broken_safetensors_header(tmp_path: Path, reader: Reader, warnings: list[str], damage: str) -> None:
    path = tmp_path / "broken.safetensors"
    if damage == "truncated":
        good = lora_file(tmp_path / "good.safetensors", {"ss_clip_skip": "2"}).read_bytes()
        path.write_bytes(good[:40])
    else:
        header = b"{not json" if damage == "not-json" else json.dumps({"__metadata__": ["ss_clip_skip"]}).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header)
    advice = reader.advise("lora", "broken", str(path))
    assert advice.findings == ()
    assert len(warnings) == 1
    assert warnings[0].startswith("ignoring broken.safetensors for clip skip: ")


def test_reads_the_header_only(tmp_path: Path, reader: Reader, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64 MiB LoRA: its metadata is read, no tensor is touched."""
    path = lora_file(tmp_path / "big.safetensors", {"ss_clip_skip": "2"})
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    big = {
        "__metadata__": header["__metadata__"],
        "w": {"dtype": "F32", "shape": [4096, 4096], "data_offsets": [0, 1 << 26]},
    }
    raw = json.dumps(big).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + (1 << 26))

    def no_tensor_reads(self: SafetensorsSource, key: str) -> None:
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(SafetensorsSource, "load", no_tensor_reads)
    assert reader.advise("lora", "big", str(path)).best == Finding("file", 2)


def test_pickles_are_never_opened(tmp_path: Path, reader: Reader, warnings: list[str]) -> None:
    path = tmp_path / "old.ckpt"
    path.write_bytes(b"\x80\x02 not even a pickle")
    assert reader.advise("checkpoint", "old", str(path)).findings == ()
    assert warnings == []


# ---------------------------------------------------------------------------------------------
# A1111's user metadata (the Checkpoints/Lora card)


def test_card_entry_notes_and_description(tmp_path: Path, reader: Reader) -> None:
    path = lora_file(tmp_path / "a.safetensors")
    card = tmp_path / "a.json"
    write_json(card, {"description": "Use Clip skip 1 for realism", "notes": "", "preferred weight": 0.8})
    assert reader.advise("lora", "a", str(path)).best == Finding("card", 1, "description")
    write_json(card, {"description": "Use Clip skip 1 for realism", "notes": "my tests: CLIP Skip: 2"})
    assert reader.advise("lora", "a", str(path)).best == Finding("card", 2, "notes")
    write_json(card, {"notes": "clip skip 2", "clip skip": 3})
    assert reader.advise("lora", "a", str(path)).best == Finding("card", 3, "clip skip")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("Recommended: clip skip 2", 2),
        ("clip_skip=2, CFG 7", 2),
        ("clipskip2", 2),
        ("clip skip 1-2 works", None),
        ("clip skip 1 or 2", None),
        ("clip skip 1 for photos, clip skip 2 for anime", None),
        ("clip skip 20", None),
        ("steps 20", None),
    ],
)
def test_clip_skip_in_free_text(text: str, value: int | None) -> None:
    assert recommend.from_text(text) == value


def test_a1111_card_without_clip_skip_says_nothing(tmp_path: Path, reader: Reader) -> None:
    """What A1111 1.10's Lora card writes (ui_edit_user_metadata.save_lora_user_metadata)."""
    path = lora_file(tmp_path / "b.safetensors")
    write_json(tmp_path / "b.json", {"description": "", "sd version": "SD1", "activation text": "b style",
                                     "preferred weight": 0.0, "negative text": "", "notes": ""})  # fmt: skip
    assert reader.advise("lora", "b", str(path)).findings == ()


# ---------------------------------------------------------------------------------------------
# CivitAI sidecars


def test_majority_of_mixed_sample_values(tmp_path: Path, reader: Reader) -> None:
    path = lora_file(tmp_path / "c.safetensors")
    write_json(tmp_path / "c.civitai.info", civitai_info("2", "2", 1, "2", ..., "junk"))
    assert reader.advise("lora", "c", str(path)).best == Finding("samples", 2, "3/4")


def test_a_tie_says_nothing(tmp_path: Path, reader: Reader) -> None:
    path = lora_file(tmp_path / "d.safetensors")
    write_json(tmp_path / "d.civitai.info", civitai_info(1, 2, ..., ...))
    assert reader.advise("lora", "d", str(path)).findings == ()


def test_civitai_generator_key_and_api_info(tmp_path: Path, reader: Reader) -> None:
    path = lora_file(tmp_path / "e.safetensors")
    write_json(tmp_path / "e.civitai.info", civitai_info(2, key="clipSkip"))
    assert reader.advise("lora", "e", str(path)).best == Finding("samples", 2, "1/1")
    (tmp_path / "e.civitai.info").unlink()
    # sd-civitai-browser-plus: the whole model; only the version that lists this file counts
    write_json(tmp_path / "e.api_info.json", {"modelVersions": [
        {"files": [{"name": "e_v2.safetensors"}], "images": civitai_info(1, 1, 1)["images"]},
        {"files": [{"name": "e.safetensors"}], "images": civitai_info(2, 2, 1)["images"]},
    ]})  # fmt: skip
    assert reader.advise("lora", "e", str(path)).best == Finding("samples", 2, "2/3")


def test_malformed_sidecar_is_ignored_with_one_line(tmp_path: Path, reader: Reader, warnings: list[str]) -> None:
    path = lora_file(tmp_path / "f.safetensors", {"ss_clip_skip": "2"})
    (tmp_path / "f.civitai.info").write_text('{"images": [', encoding="utf-8")
    (tmp_path / "f.json").write_bytes(b"\xff\xfe not utf-8")
    assert reader.advise("lora", "f", str(path)).best == Finding("file", 2)
    assert sorted(w.split(":")[0] for w in warnings) == [
        "ignoring f.civitai.info for clip skip",
        "ignoring f.json for clip skip",
    ]
    write_json(tmp_path / "f.civitai.info", ["not", "a", "model"])  # valid JSON, wrong shape: silent
    warnings.clear()
    assert reader.advise("lora", "f", str(path)).best == Finding("file", 2)
    assert warnings == [
        "ignoring f.json for clip skip: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"
    ]


def test_cache_follows_the_files(tmp_path: Path, reader: Reader) -> None:
    path = lora_file(tmp_path / "g.safetensors")
    assert reader.advise("lora", "g", str(path)).findings == ()
    write_json(tmp_path / "g.civitai.info", civitai_info(2))
    assert reader.advise("lora", "g", str(path)).best == Finding("samples", 2, "1/1")
    info = tmp_path / "g.civitai.info"
    write_json(info, civitai_info(1))
    os.utime(info, ns=(1, 1))  # a different version of the file, whatever the clock's resolution
    assert reader.advise("lora", "g", str(path)).best == Finding("samples", 1, "1/1")


# ---------------------------------------------------------------------------------------------
# precedence and combining


def test_precedence_yours_card_file_samples(tmp_path: Path, reader: Reader) -> None:
    path = lora_file(tmp_path / "h.safetensors", {"ss_clip_skip": "1", "ss_base_model_version": "sd_v1"})
    write_json(tmp_path / "h.civitai.info", civitai_info(3, 3))
    assert [f.source for f in reader.advise("lora", "h", str(path)).findings] == ["file", "samples"]
    write_json(tmp_path / "h.json", {"notes": "clip skip 2"})
    advice = reader.advise("lora", "h", str(path), own=4)
    assert advice.findings == (Finding("yours", 4), Finding("card", 2, "notes"), Finding("file", 1),
                               Finding("samples", 3, "2/2"))  # fmt: skip
    assert advice.best == Finding("yours", 4)
    assert [f.source for f in advice.disagreeing()] == ["card", "file", "samples"]


def test_combine_agreement_conflict_and_other_families() -> None:
    ckpt = ModelAdvice("checkpoint", "anything-v5", (Finding("samples", 2, "5/6"),))
    lora_2 = ModelAdvice("lora", "style", (Finding("file", 2),), "sd1")
    lora_1 = ModelAdvice("lora", "photo", (Finding("file", 1),), "sd1")
    silent = ModelAdvice("lora", "quiet")
    assert combine([ckpt, lora_2, silent], "sd1").value == 2
    mixed = combine([ckpt, lora_1], "sd1")
    assert mixed.conflict
    assert mixed.value is None
    assert mixed.values == (1, 2)
    on_xl = combine([lora_1, ModelAdvice("checkpoint", "xl", ())], "sdxl")  # an SD1 LoRA on SDXL
    assert on_xl.value is None
    assert [m.name for m in on_xl.off_family] == ["photo"]
    assert combine([], "sd1").value is None


# ---------------------------------------------------------------------------------------------
# prompts


def test_lora_names_in_both_uis_syntax() -> None:
    prompts = [
        "1girl, <lora:anime_style:0.8>, <lyco:old_locon:1>, (masterpiece:1.2), <hypernet:h:1>",
        "<lora:my lora v2:0.5:0.7> <lora:dyn:1:1:8> <lora:named:te=0.5:unet=1> <lora:anime_style:1>",
        "[<lora:sched_a:1>:<lora:sched_b:1>:0.5] <lora:off:0> <lora:te_off:te=0:unet=0> <lora:unet_only:0:1>",
        "<lora::1> <LoRA:not_a_network:1>",  # the hosts skip an unknown network name (case-sensitive)
    ]
    assert lora_names(prompts) == ["anime_style", "old_locon", "my lora v2", "dyn", "named", "sched_a", "sched_b",
                                   "unet_only"]  # fmt: skip
    assert lora_names(["no networks here", ""]) == []
