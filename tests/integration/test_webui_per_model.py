"""The clip-skip recommendation on a running A1111 1.10 / Forge 2 (``-m integration``; SD1 checkpoint).

Needs ``TE_SWITCH_WEBUI_URL`` and ``TE_SWITCH_WEBUI_MODELS`` (the server's models folder, whose
``Lora`` subfolder is the server's LoRA folder): a small LoRA whose kohya metadata says it was trained
at clip skip 2 is written there (its deltas are zero) and removed afterwards.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from webui_client import URL, call, txt2img

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not URL, reason="set TE_SWITCH_WEBUI_URL to a running WebUI with TE Switch"),
]
NAME = "te_switch_it_clip_skip_2"
PROMPT = f"a red cat on a blue chair <lora:{NAME}:1>"


@pytest.fixture(scope="module")
def lora() -> Iterator[Path]:
    models = os.environ.get("TE_SWITCH_WEBUI_MODELS")
    if not models:
        pytest.skip("set TE_SWITCH_WEBUI_MODELS (the server's models folder)")
    path = Path(models) / "Lora" / f"{NAME}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 768), f"{key}.lora_up.weight": torch.zeros(3072, 4),
               f"{key}.alpha": torch.tensor(4.0)}, str(path),
              metadata={"ss_clip_skip": "2", "ss_base_model_version": "sd_v1", "ss_output_name": NAME})  # fmt: skip
    call("/sdapi/v1/refresh-loras", {})
    try:
        yield path
    finally:
        path.unlink()
        call("/sdapi/v1/refresh-loras", {})


def test_route_reads_the_loras_file(lora: Path) -> None:
    answer = call("/te-switch/v1/recommend?prompt=" + urllib.parse.quote(PROMPT))
    assert answer["clip_skip"] == 2
    assert answer["conflict"] is False
    lora_entry = next(m for m in answer["models"] if m["kind"] == "lora")
    assert lora_entry["name"] == NAME
    assert lora_entry["findings"][0] == {"source": "file", "value": 2, "detail": ""}


def test_automatic_mode_is_the_image_of_explicit_2(lora: Path) -> None:
    explicit = txt2img([False, 2], prompt=PROMPT)
    automatic = txt2img([True, 1], prompt=PROMPT, override_settings={"te_switch_auto_recommended": True})
    host_own = txt2img([True, 1], prompt=PROMPT)
    assert automatic.hash == explicit.hash
    assert "Clip skip: 2" in automatic.infotext
    assert host_own.hash != explicit.hash  # on SD1 the host's own is clip skip 1: the mode did something
    assert "Clip skip" not in host_own.infotext
