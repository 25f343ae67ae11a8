"""What the integration tests share: HTTP calls to the WebUI, pixel hashes, encoder files with real
shapes and random weights written where the server looks for them."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

URL = os.environ.get("TE_SWITCH_WEBUI_URL", "").rstrip("/")
TITLE = "CLIP Skip & Text Encoders"
BASE = {"prompt": "a red cat on a blue chair", "negative_prompt": "", "steps": 2, "width": 64, "height": 64,
        "seed": 1234, "sampler_name": "Euler", "cfg_scale": 7}  # fmt: skip


class HTTPError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def call(path: str, payload: Any = None, *, method: str | None = None, timeout: float = 1800) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(URL + path, data=data, headers={"Content-Type": "application/json"},
                                     method=method or ("GET" if payload is None else "POST"))  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            body = json.loads(body)
        except ValueError:
            pass
        raise HTTPError(e.code, body) from None


@contextmanager
def checkpoint_selected(name: str | None, **options: Any) -> Iterator[None]:
    """The server on checkpoint ``name`` (None: where it is) with ``options`` set; its checkpoint put back after."""
    before = call("/sdapi/v1/options").get("sd_model_checkpoint")
    if name is not None or options:
        call("/sdapi/v1/options", {**({"sd_model_checkpoint": name} if name is not None else {}), **options})
    try:
        yield
    finally:
        if before:
            call("/sdapi/v1/options", {"sd_model_checkpoint": before})


def pixels(b64: str) -> str:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
    return hashlib.sha256(image.tobytes()).hexdigest()


class Result:
    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response
        self.info = json.loads(response["info"])
        self.images = response["images"]
        self.hashes = [pixels(b) for b in self.images]

    @property
    def hash(self) -> str:
        return self.hashes[0]

    @property
    def infotext(self) -> str:
        return self.info["infotexts"][0]

    def size(self, index: int = 0) -> tuple[int, int]:
        from PIL import Image

        return Image.open(io.BytesIO(base64.b64decode(self.images[index]))).size


def txt2img(args: list[Any] | None = None, **extra: Any) -> Result:
    body = {**BASE, **extra}
    if args is not None:
        body["alwayson_scripts"] = {TITLE: {"args": args}}
    return Result(call("/sdapi/v1/txt2img", body))


def rejected(args: list[Any] | None = None, **extra: Any) -> HTTPError:
    with pytest.raises(HTTPError) as info:
        txt2img(args, **extra)
    return info.value


def xyz_args(label: str, values: list[str]) -> list[Any]:
    """X axis = ``label`` over ``values`` (dropdown mode); every other argument at the host's UI default
    (the X/Y/Z script's arguments differ between A1111, Forge, reForge and Forge Classic)."""
    info = next(s for s in call("/sdapi/v1/script-info") if s["name"] == "x/y/z plot" and not s["is_img2img"])
    choices = info["args"][0]["choices"]
    assert label in choices, f"{label} not among the X/Y/Z axes"
    args = [a.get("value") for a in info["args"]]
    args[0], args[1], args[2] = choices.index(label), "", values  # x_type, x_values, x_values_dropdown
    for i in (3, 6):  # y_type, z_type: Nothing
        args[i], args[i + 2] = 0, []
    for i, arg in enumerate(info["args"]):
        if arg.get("label") in ("Include Sub Images", "Include lone images"):
            args[i] = True  # the cells come back after the grid
    return args


def short_hash(name: str) -> str:
    """The short hash TE Switch writes into the infotext for encoder ``name`` (hashed on request)."""
    rows = call("/te-switch/v1/encoders?hashes=true")["encoders"]
    return next(r["short_hash"] for r in rows if r["name"] == name)


def encoder_dir() -> Path:
    direct = os.environ.get("TE_SWITCH_WEBUI_ENCODER_DIR")
    if direct:
        return Path(direct)
    models = os.environ.get("TE_SWITCH_WEBUI_MODELS")
    if not models:
        pytest.skip("set TE_SWITCH_WEBUI_MODELS (the server's models folder) or TE_SWITCH_WEBUI_ENCODER_DIR")
    return Path(models) / "CLIP"


def write_clip(
    path: Path,
    *,
    seed: int,
    width: int = 768,
    layers: int = 12,
    positions: int = 77,
    projection: bool = False,
    nan: bool = False,
    truncate: bool = False,
) -> Path:
    """An HF-layout CLIP text tower (CLIP-L by default; 1280 wide × 32 layers is a CLIP-G), fp16."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    ff = 4 * width
    tensors: dict[str, torch.Tensor] = {
        "text_model.embeddings.token_embedding.weight": torch.randn(49408, width, generator=gen) * 0.02,
        "text_model.embeddings.position_embedding.weight": torch.randn(positions, width, generator=gen) * 0.01,
        "text_model.final_layer_norm.weight": torch.ones(width),
        "text_model.final_layer_norm.bias": torch.zeros(width),
    }
    for i in range(layers):
        b = f"text_model.encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            tensors[f"{b}self_attn.{n}.weight"] = torch.randn(width, width, generator=gen) * 0.02
            tensors[f"{b}self_attn.{n}.bias"] = torch.zeros(width)
        tensors[f"{b}mlp.fc1.weight"] = torch.randn(ff, width, generator=gen) * 0.02
        tensors[f"{b}mlp.fc1.bias"] = torch.zeros(ff)
        tensors[f"{b}mlp.fc2.weight"] = torch.randn(width, ff, generator=gen) * 0.02
        tensors[f"{b}mlp.fc2.bias"] = torch.zeros(width)
        for n in ("layer_norm1", "layer_norm2"):
            tensors[f"{b}{n}.weight"] = torch.ones(width)
            tensors[f"{b}{n}.bias"] = torch.zeros(width)
    if projection:
        tensors["text_projection.weight"] = torch.randn(width, width, generator=gen) * 0.02
    if nan:
        tensors["text_model.final_layer_norm.weight"][5] = float("nan")
    tensors = {k: v.to(torch.float16) for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    if truncate:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    return path
