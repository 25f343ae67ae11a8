"""REST routes and the check that guards ``/sdapi/v1/txt2img|img2img``.

Routes (added in ``on_app_started``; behind ``--api-auth`` like the WebUI's own)::

    GET  /te-switch/v1/encoders[?hashes=true]   the library (short hashes: cached, or computed on request)
    POST /te-switch/v1/refresh                   rescan the folders, then the same answer
    GET  /te-switch/v1/state                     host status, the effective-layer line, our options
    GET  /te-switch/v1/recommend?prompt=…        what the loaded checkpoint and the prompt's LoRAs recommend

Generation requests carrying our ``alwayson_scripts`` args (or our ``override_settings`` keys)
are checked before the WebUI sees them: a file outside the encoder folders, a missing file, a
kind that does not fit the slot, or a file that does not read whole or holds NaN/Inf is answered
with a 4xx and a one-line ``detail``, so no generation starts and the model is never touched.
A request with an ``infotext`` and no args of ours gets them from the infotext (the API does not
run ``on_infotext_pasted``, so this is where "no Clip skip key" becomes Auto).

Nothing here swaps anything: swaps happen only inside a generation, which the WebUI serialises;
the state route reads under the engine's lock.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict
from hmac import compare_digest
from typing import Any

from te_switch.core.errors import TESwitchError, one_line
from te_switch.core.selection import ALL_SLOTS, Selection
from te_switch.webui import infotext, library, options, recommend, runtime, sources
from te_switch.webui.args import ArgsError, dict_from_selection, parse_encoder, selection_from_args, selection_from_dict
from te_switch.webui.ui import TITLE

log = logging.getLogger(__name__)
PREFIX = "/te-switch/v1"
GENERATION_ROUTES = {"/sdapi/v1/txt2img": "txt2img", "/sdapi/v1/img2img": "img2img"}
_GUARD_MARK = "_te_switch_guarded"


class Rejected(Exception):
    """A generation request that must not start: HTTP status and one line."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# request checking (pure: body in, body out)


def _our_args(body: dict[str, Any]) -> tuple[str | None, Any]:
    scripts = body.get("alwayson_scripts")
    if not isinstance(scripts, dict):
        return None, None
    for name, value in scripts.items():
        if isinstance(name, str) and name.lower() == TITLE.lower():
            return name, value
    return None, None


def _check_encoder(value: Any, slot: str) -> None:
    try:
        name = parse_encoder(value)
        if name is None:
            return
        sources.check_values(sources.source(name, slot))  # the generation it lets through reuses the source
    except library.EncoderLookupError as e:
        raise Rejected(e.http_status, one_line(e)) from None
    except ArgsError as e:
        raise Rejected(422, str(e)) from None
    except TESwitchError as e:
        raise Rejected(422, one_line(e)) from None


def _check_overrides(overrides: Any) -> None:
    if not isinstance(overrides, dict):
        return
    for key, value in overrides.items():
        if not (isinstance(key, str) and key.startswith("te_switch_")):
            continue
        try:
            if key == options.CLIP_SKIP:
                selection_from_dict({"clip_skip": value})
            elif key == options.SCOPE:
                selection_from_dict({"scope": value})
            elif key.startswith("te_switch_precision_"):
                selection_from_dict({f"{key[len('te_switch_precision_') :]}_precision": value})
        except (ArgsError, ValueError) as e:
            raise Rejected(422, f"{key}: {e}") from None
        if key.startswith("te_switch_encoder_") and key[len("te_switch_encoder_") :] in ALL_SLOTS:
            try:
                _check_encoder(value, key[len("te_switch_encoder_") :])
            except Rejected as e:
                raise Rejected(e.status, f"{key}: {e.detail}") from None


def _from_infotext(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Our dict arg from an infotext, the way pasting it in the UI would set the panel (and the
    WebUI's own parse of it)."""
    try:
        from modules import infotext_utils

        params = infotext_utils.parse_generation_parameters(text)
    except ImportError:
        params = {}
    pasted = infotext.read(text, params)
    for warning in pasted.warnings:
        print(f"{runtime.PREFIX}API infotext: {warning}")
    out = pasted.as_dict()
    out.setdefault("clip_skip", "Auto")
    return out, params


def forge_infotext_fields(data: dict[str, Any], params: dict[str, Any], route: str) -> None:
    """Work around Forge 2's ``apply_infotext`` (dfdcbab): every ``infotext`` request answers HTTP 500
    ("isinstance() argument 2 cannot be a parameterized generic") because fields typed ``list[str]``
    (Styles, "Hires VAE/TE") reach ``isinstance``, and Gradio 4's ``gr.update()`` is not unwrapped.
    Forge skips fields a request sets itself, so set those to what the infotext says."""
    from te_switch import hosts

    if hosts.kind_of_environment() != hosts.FORGE:
        return
    try:
        import typing

        from modules import infotext_utils
        from modules.api import models

        model = {
            "txt2img": models.StableDiffusionTxt2ImgProcessingAPI,
            "img2img": models.StableDiffusionImg2ImgProcessingAPI,
        }[route]
        fields = infotext_utils.paste_fields[route]["fields"]
    except (ImportError, AttributeError, KeyError):
        return
    for field in fields:
        api = getattr(field, "api", None)
        declared = getattr(model, "model_fields", {}).get(api) if api else None
        if declared is None or api in data:
            continue
        annotation = declared.annotation
        if typing.get_origin(annotation) is typing.Union:
            annotation = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
        if typing.get_origin(annotation) is None:
            continue  # a plain type: Forge converts it fine
        try:
            value = field.function(params) if field.function else params.get(field.label)
        except Exception:  # a paste helper that fails here fails in Forge too
            continue
        if isinstance(value, dict) and "__type__" in value:
            value = value.get("value")
        data[api] = value


def check_request(body: bytes, route: str = "txt2img") -> bytes:
    """Validate (and, for an ``infotext`` request, complete) a generation request body.

    Returns the body to pass on (the same object when nothing changed); raises :class:`Rejected`.
    """
    try:
        data = json.loads(body or b"null")
    except ValueError:
        return body  # not ours to judge: the WebUI answers malformed JSON itself
    if not isinstance(data, dict):
        return body
    _check_overrides(data.get("override_settings"))
    name, entry = _our_args(data)
    args = entry.get("args") if isinstance(entry, dict) else None
    if name is not None and args is not None:
        if not isinstance(args, list):
            raise Rejected(422, f"alwayson_scripts[{name!r}].args must be a list")
        try:
            panel = selection_from_args(args)
        except (ArgsError, ValueError) as e:
            raise Rejected(422, f"{TITLE}: {e}") from None
        for slot, choice in panel.slots.items():
            _check_encoder(choice.encoder, slot)
        return body
    text = data.get("infotext")
    if isinstance(text, str) and text.strip():
        scripts = data.get("alwayson_scripts") if isinstance(data.get("alwayson_scripts"), dict) else {}
        scripts = {k: v for k, v in scripts.items() if k != name}
        pasted, params = _from_infotext(text)
        for slot in ALL_SLOTS:
            _check_encoder(pasted.get(slot), slot)  # found but unreadable: say so, do not guess
        scripts[TITLE] = {"args": [pasted]}
        data["alwayson_scripts"] = scripts
        forge_infotext_fields(data, params, route)
        return json.dumps(data).encode("utf-8")
    return body


# ---------------------------------------------------------------------------------------------
# auth (the WebUI adds its --api-auth check to its own routes only)


def _credentials() -> dict[str, str]:
    try:
        from modules import shared
    except ImportError:
        return {}
    spec = getattr(shared.cmd_opts, "api_auth", None)
    creds: dict[str, str] = {}
    for pair in (spec or "").split(","):
        if ":" in pair:
            user, password = pair.split(":", 1)
            creds[user] = password
    return creds


def authorized(header: str | None) -> bool:
    """True without ``--api-auth``, else when the Basic credentials match one of its pairs."""
    creds = _credentials()
    if not creds:
        return True
    if not header or not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    return user in creds and compare_digest(password, creds[user])


# ---------------------------------------------------------------------------------------------
# the guard around the generation routes (an ASGI wrapper on the route, no app-wide middleware)


def guard(original: Callable[..., Any], route: str = "txt2img") -> Callable[..., Any]:
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            await original(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the route see it
                await original(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        new_body = body
        if authorized(headers.get("authorization")):
            try:
                new_body = await run_in_threadpool(check_request, body, route)
            except Rejected as e:
                print(f"{runtime.PREFIX}rejected {scope.get('path')}: {e.detail}")
                response = JSONResponse({"error": "TESwitchError", "detail": e.detail}, status_code=e.status)
                await response(scope, receive, send)
                return
        if new_body is not body:
            scope = dict(scope)
            scope["headers"] = [
                (k, str(len(new_body)).encode()) if k.lower() == b"content-length" else (k, v)
                for k, v in scope.get("headers", [])
            ]
        message = {"type": "http.request", "body": new_body, "more_body": False}
        await original(scope, _replay([message], receive), send)

    setattr(app, _GUARD_MARK, original)
    return app


def _replay(messages: list[dict[str, Any]], receive: Callable[..., Any]) -> Callable[..., Any]:
    pending = list(messages)

    async def replay() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


def guard_generation_routes(app: Any) -> int:
    """Wrap the txt2img/img2img routes' ASGI apps (once). Returns how many were wrapped."""
    count = 0
    for route in getattr(app.router, "routes", []):
        if getattr(route, "path", None) in GENERATION_ROUTES and not hasattr(route.app, _GUARD_MARK):
            route.app = guard(route.app, GENERATION_ROUTES[route.path])
            count += 1
    return count


# ---------------------------------------------------------------------------------------------
# routes


@contextlib.contextmanager
def _engine_lock(host: Any, timeout: float = 10.0) -> Iterator[bool]:
    """Hold the swap engine's lock while reading (False when a swap kept it past ``timeout``)."""
    lock = getattr(getattr(host, "engine", None), "_lock", None)
    if lock is None:
        yield True
        return
    got = lock.acquire(timeout=timeout)
    try:
        yield got
    finally:
        if got:
            lock.release()


def encoders_payload(*, with_hashes: bool = False) -> dict[str, Any]:
    lib = library.get_library()
    return {"folders": lib.folders, "encoders": [asdict(r) for r in library.rows(with_hashes=with_hashes)]}


def list_encoders(hashes: bool = False) -> dict[str, Any]:
    return encoders_payload(with_hashes=hashes)


def refresh_encoders() -> dict[str, Any]:
    library.refresh()
    return encoders_payload()


def state() -> dict[str, Any]:
    host = runtime.adapter()
    status: dict[str, Any] | None = None
    busy = False
    if host is not None:
        with _engine_lock(host) as got:
            busy = not got
            if got:
                try:
                    status = host.status()
                except Exception as e:
                    status = {"error": one_line(e)}
    try:
        global_selection: Selection | None = options.global_selection()
    except (ArgsError, ValueError):
        global_selection = None
    try:
        from modules import shared

        values = {k: getattr(shared.opts, k, None) for k in options.all_keys()}
    except ImportError:
        values = {}
    return {
        "host": status,
        "busy": busy,
        "layers": runtime.describe(Selection()),
        "global_selection": dict_from_selection(global_selection) if global_selection else None,
        "options": values,
        "last_error": runtime.last_error(),
        "folders": library.get_library().folders,
    }


def recommendation(prompt: str = "") -> dict[str, Any]:
    """The clip skip the loaded checkpoint and the LoRAs of ``prompt`` recommend, with every source."""
    return recommend.payload(recommend.advice_for([prompt]))


def _dependencies() -> list[Any]:
    if not _credentials():
        return []
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic

    # no annotation on `credentials`: with postponed annotations FastAPI would have to resolve a
    # name imported here, which fails on A1111's FastAPI 0.94; the dependency gives the value anyway
    def auth(credentials=Depends(HTTPBasic())) -> bool:  # noqa: B008 - FastAPI idiom
        creds = _credentials()
        if credentials.username in creds and compare_digest(credentials.password, creds[credentials.username]):
            return True
        raise HTTPException(
            status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"}
        )

    return [Depends(auth)]


def add_routes(app: Any) -> None:
    if any(getattr(r, "path", "").startswith(PREFIX) for r in getattr(app.router, "routes", [])):
        return  # a UI reload runs app_started again on the same app
    deps = _dependencies()
    app.add_api_route(f"{PREFIX}/encoders", list_encoders, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/refresh", refresh_encoders, methods=["POST"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/state", state, methods=["GET"], dependencies=deps)
    app.add_api_route(f"{PREFIX}/recommend", recommendation, methods=["GET"], dependencies=deps)


def on_app_started(demo: Any, app: Any) -> None:
    add_routes(app)
    guard_generation_routes(app)
