"""REST routes and the check in front of /sdapi/v1/txt2img|img2img (FastAPI's TestClient)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from test_webui_support import FakeHost, truncate, use_host, webui, write_clip  # noqa: F401 - fixture

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

TITLE = "CLIP Skip & Text Encoders"


class Api:
    """A FastAPI app with stand-ins for the WebUI's generation routes, after our app_started."""

    def __init__(self) -> None:
        self.app = fastapi.FastAPI()
        self.received: list[dict[str, Any]] = []

        async def txt2img(request: fastapi.Request) -> dict[str, Any]:
            raw = await request.body()
            try:
                self.received.append(json.loads(raw))
            except ValueError:
                self.received.append({"raw": raw.decode()})
            return {"images": []}

        self.app.add_api_route("/sdapi/v1/txt2img", txt2img, methods=["POST"])
        self.app.add_api_route("/sdapi/v1/img2img", txt2img, methods=["POST"])
        from te_switch.webui import api

        api.on_app_started(None, self.app)
        api.on_app_started(None, self.app)  # a UI reload runs app_started again
        self.client = TestClient(self.app)

    def generate(self, args: list[Any] | None = None, route: str = "txt2img", **body: Any) -> Any:
        if args is not None:
            body["alwayson_scripts"] = {TITLE.lower(): {"args": args}}
        return self.client.post(f"/sdapi/v1/{route}", json={"prompt": "a cat", **body})


@pytest.fixture
def api(webui: dict[str, Path]) -> Api:  # noqa: F811
    from te_switch.webui import options

    options.register()
    use_host(FakeHost("sd1"))
    return Api()


def test_routes_are_added_once(api: Api) -> None:
    paths = [getattr(r, "path", "") for r in api.app.router.routes]
    assert paths.count("/te-switch/v1/encoders") == 1
    assert paths.count("/te-switch/v1/state") == 1


def test_list_and_refresh(api: Api, webui: dict[str, Path]) -> None:  # noqa: F811
    write_clip(webui["clip"] / "a.safetensors")
    write_clip(webui["models"] / "text_encoders" / "long.safetensors", kind="long-clip-l", positions=248)
    truncate(write_clip(webui["clip"] / "broken.safetensors"))
    body = api.client.get("/te-switch/v1/encoders").json()
    assert body["folders"][:3] == [str(webui["models"] / sub) for sub in ("CLIP", "text_encoder", "text_encoders")]
    rows = {r["name"]: r for r in body["encoders"]}
    assert rows["a.safetensors"]["kind"] == "clip-l"
    assert rows["a.safetensors"]["slots"] == ["clip_l"]
    assert rows["a.safetensors"]["short_hash"] is None  # not computed unless asked
    assert rows["a.safetensors"]["format"] == "safetensors"
    assert rows["a.safetensors"]["size"] == (webui["clip"] / "a.safetensors").stat().st_size
    assert rows["long.safetensors"]["label"] == "long.safetensors (Long-CLIP-L · 248)"
    assert rows["long.safetensors"]["positions"] == 248
    assert "truncated" in rows["broken.safetensors"]["error"]
    assert rows["broken.safetensors"]["slots"] == []
    hashed = {r["name"]: r for r in api.client.get("/te-switch/v1/encoders?hashes=true").json()["encoders"]}
    assert len(hashed["a.safetensors"]["short_hash"]) == 10
    assert api.client.get("/te-switch/v1/encoders").json()["encoders"][0]["short_hash"] is not None  # now cached
    write_clip(webui["clip"] / "new.safetensors")
    names = [r["name"] for r in api.client.post("/te-switch/v1/refresh").json()["encoders"]]
    assert "new.safetensors" in names


def test_state(api: Api) -> None:
    from modules import shared

    shared.opts.set("te_switch_clip_skip", "2")
    body = api.client.get("/te-switch/v1/state").json()
    assert body["host"]["family"] == "sd1"
    assert body["busy"] is False
    assert body["options"]["te_switch_clip_skip"] == "2"
    assert body["global_selection"] == {"clip_skip": 2}
    assert body["last_error"] is None


def test_valid_request_passes_through_untouched(api: Api, webui: dict[str, Path]) -> None:  # noqa: F811
    write_clip(webui["clip"] / "a.safetensors")
    response = api.generate([False, 2, "both", "a.safetensors", "fp32"])
    assert response.status_code == 200
    assert api.received[-1]["alwayson_scripts"][TITLE.lower()]["args"] == [False, 2, "both", "a.safetensors", "fp32"]
    assert api.generate([{"clip_skip": 1, "clip_l": "a.safetensors"}], route="img2img").status_code == 200
    assert api.generate().status_code == 200  # not ours: untouched
    assert api.client.post("/sdapi/v1/txt2img", content=b"not json").status_code == 200
    assert api.received[-1] == {"raw": "not json"}  # the WebUI answers malformed JSON itself


@pytest.mark.parametrize(
    ("make", "value", "status", "detail"),
    [
        (None, "/etc/passwd", 422, "/etc/passwd: outside the encoder folders"),
        (None, "../../escape.safetensors", 422, "outside the encoder folders"),
        (None, "nowhere.safetensors", 404, "nowhere.safetensors: no such encoder in the encoder folders"),
        ("clip-g", "g.safetensors", 422, "g.safetensors: a CLIP-G file cannot go into the CLIP-L slot (CLIP-L, Long-CLIP-L)"),
        ("truncated", "t.safetensors", 422, "t.safetensors: truncated"),
        ("nan", "n.safetensors", 422, "n.safetensors: tensor text_model.final_layer_norm.weight holds NaN or Inf values"),
    ],
)  # fmt: skip
def test_bad_files_are_refused_before_generation(
    api: Api,
    webui: dict[str, Path],  # noqa: F811
    make: str | None,
    value: str,
    status: int,
    detail: str,
) -> None:
    if make == "clip-g":
        write_clip(webui["clip"] / value, kind="clip-g")
    elif make == "truncated":
        truncate(write_clip(webui["clip"] / value))
    elif make == "nan":
        write_clip(webui["clip"] / value, nan=True)
    for args in ([False, 2, "both", value], [{"clip_l": value}]):
        response = api.generate(args)
        assert response.status_code == status, response.text
        assert detail in response.json()["detail"]
        assert "\n" not in response.json()["detail"]
    assert api.received == []  # the WebUI never saw it: no generation started


@pytest.mark.parametrize(
    ("override", "status", "detail"),
    [
        ({"te_switch_clip_skip": "13"}, 422, "te_switch_clip_skip: clip skip must be 1..12 or Auto"),
        ({"te_switch_encoder_clip_l": "gone.safetensors"}, 404, "te_switch_encoder_clip_l: gone.safetensors"),
        ({"te_switch_precision_t5xxl": "fp4"}, 422, "te_switch_precision_t5xxl: precision must be one of"),
    ],
)
def test_bad_override_settings_are_refused(api: Api, override: dict[str, Any], status: int, detail: str) -> None:
    response = api.generate(override_settings=override)
    assert response.status_code == status
    assert detail in response.json()["detail"]
    assert api.generate(override_settings={"te_switch_clip_skip": "2"}).status_code == 200


def test_bad_args_shape(api: Api) -> None:
    assert "unknown key 'clipskip'" in api.generate([{"clipskip": 2}]).json()["detail"]
    response = api.client.post("/sdapi/v1/txt2img", json={"alwayson_scripts": {TITLE: {"args": "2"}}})
    assert response.status_code == 422
    assert "must be a list" in response.json()["detail"]


def test_infotext_request_gets_our_args(api: Api, webui: dict[str, Path]) -> None:  # noqa: F811
    from te_switch.webui import sources

    write_clip(webui["clip"] / "a.safetensors")
    digest = sources.short_hash(sources.source("a.safetensors", "clip_l"))
    text = f"a cat\nSteps: 20, Sampler: Euler, Seed: 1, Clip skip: 3, TE CLIP-L: a.safetensors [{digest}]"
    assert api.generate(infotext=text).status_code == 200
    args = api.received[-1]["alwayson_scripts"][TITLE]["args"]
    assert args[0]["clip_skip"] == 3
    assert args[0]["clip_l"] == "a.safetensors"
    api.generate(infotext="a cat\nSteps: 20, Sampler: Euler, Seed: 1")
    assert api.received[-1]["alwayson_scripts"][TITLE]["args"][0]["clip_skip"] == "Auto"  # absent = Auto, not 1
    api.generate([False, 5], infotext=text)  # explicit args win over the infotext
    assert api.received[-1]["alwayson_scripts"][TITLE.lower()]["args"] == [False, 5]
    missing = "a cat\nSteps: 20, Sampler: Euler, Seed: 1, TE CLIP-L: gone.safetensors [0123456789]"
    assert api.generate(infotext=missing).status_code == 200
    assert api.received[-1]["alwayson_scripts"][TITLE]["args"][0]["clip_l"] == "Built-in"


def test_api_auth(api: Api, webui: dict[str, Path]) -> None:  # noqa: F811
    from modules import shared

    shared.cmd_opts.api_auth = "user:secret"
    try:
        fresh = Api()
        assert fresh.client.get("/te-switch/v1/state").status_code == 401
        good = {"Authorization": "Basic " + base64.b64encode(b"user:secret").decode()}
        assert fresh.client.get("/te-switch/v1/state", headers=good).status_code == 200
        # without credentials nothing is revealed about files: the request goes on to the
        # WebUI's own route (which answers 401 there)
        response = fresh.client.post(
            "/sdapi/v1/txt2img", json={"alwayson_scripts": {TITLE: {"args": [{"clip_l": "x"}]}}}
        )
        assert response.status_code == 200
        response = fresh.client.post(
            "/sdapi/v1/txt2img", json={"alwayson_scripts": {TITLE: {"args": [{"clip_l": "x"}]}}}, headers=good
        )
        assert response.status_code == 404
    finally:
        shared.cmd_opts.api_auth = None


def test_forge_infotext_workaround(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forge 2's apply_infotext crashes on list-typed fields unless the request sets them."""
    import sys
    import types
    from typing import Optional

    import pydantic
    from modules import infotext_utils

    import te_switch.hosts

    if int(pydantic.VERSION.split(".")[0]) < 2:
        pytest.skip("Forge's request models are pydantic 2 (A1111's pydantic 1 has no such bug)")

    class Txt2Img(pydantic.BaseModel):
        styles: Optional[list[str]] = None  # noqa: UP045 - as Forge's models declare it
        hr_additional_modules: Optional[list[str]] = None  # noqa: UP045
        steps: Optional[int] = None  # noqa: UP045

    models = types.ModuleType("modules.api.models")
    models.StableDiffusionTxt2ImgProcessingAPI = Txt2Img
    models.StableDiffusionImg2ImgProcessingAPI = Txt2Img
    monkeypatch.setitem(sys.modules, "modules.api", types.ModuleType("modules.api"))
    monkeypatch.setitem(sys.modules, "modules.api.models", models)
    fields = [
        infotext_utils.PasteField(None, lambda d: {"__type__": "update"}, api="styles"),
        infotext_utils.PasteField(None, "Hires VAE/TE", api="hr_additional_modules"),
        infotext_utils.PasteField(None, "Steps", api="steps"),
    ]
    monkeypatch.setitem(infotext_utils.paste_fields, "txt2img", {"fields": fields})
    text = "a cat\nSteps: 20, Sampler: Euler, Seed: 1, Hires VAE/TE: x"
    monkeypatch.setattr(te_switch.hosts, "kind_of_environment", lambda: "a1111")
    api.generate(infotext=text)
    assert "styles" not in api.received[-1]  # A1111 is not affected: nothing added
    monkeypatch.setattr(te_switch.hosts, "kind_of_environment", lambda: "forge")
    api.generate(infotext=text, steps=3)
    body = api.received[-1]
    assert body["styles"] is None  # gr.update() (Gradio 4) -> nothing to paste, but now "set"
    assert body["hr_additional_modules"] == "x"
    assert body["steps"] == 3  # plain types and fields the request sets stay as they are
