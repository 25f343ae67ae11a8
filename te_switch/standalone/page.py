"""``python -m te_switch ui``: a local Gradio page with the WebUI's own TE Switch panel, on diffusers.

The page reuses :func:`te_switch.webui.ui.build_panel` (the accordion the WebUIs show) with a
:class:`PanelBackend` wired to a :class:`DiffusersAdapter`, and adds what a WebUI would: a prompt
with a token counter that knows Long-CLIP (``N/75`` or ``N/246``), Generate, the image with its
infotext, and the ``inspect`` table of the encoder library. It listens on 127.0.0.1 unless told
otherwise; nothing is downloaded (Gradio's analytics are off).
"""

from __future__ import annotations

import html
import os
import sys
import tempfile
import threading
from typing import Any

from te_switch.core.clip_skip import NATIVE_SKIP, clip_towers
from te_switch.core.errors import TESwitchError, one_line
from te_switch.core.longclip import chunk_length
from te_switch.core.selection import KINDS_BY_SLOT, Selection
from te_switch.standalone.demo import DEMO_STEPS
from te_switch.standalone.generate import default_size, generate, save_result
from te_switch.standalone.model import Model, open_model
from te_switch.standalone.table import HEAD, tower_row
from te_switch.webui.args import ArgsError, selection_from_args
from te_switch.webui.labels import decorate
from te_switch.webui.ui import PanelBackend, build_panel

ELEM_PREFIX = "te_switch_"
STYLE_CSS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "style.css")


def page_css() -> str:
    """The panel's stylesheet the WebUIs load (style.css), plus what only this page needs."""
    try:
        with open(STYLE_CSS, encoding="utf-8") as f:
            shared = f.read()
    except OSError:  # an install without the repository's style.css: the panel still works, plainer
        shared = ""
    return shared + "\n.te-switch-over { color: #c0392b; }\n"


CSS = page_css()
# the library table without the vocabulary column
INSPECT_COLUMNS = [i for i, name in enumerate(HEAD) if name != "vocab"]
INSPECT_HEAD = [HEAD[i] for i in INSPECT_COLUMNS]


def elem_id(item: str) -> str:
    return ELEM_PREFIX + item


class LocalBackend:
    """The panel's view of the local model: the adapter for layers and slots, the library for files."""

    def __init__(self, model: Model, outputs: str | None = None) -> None:
        self.model = model
        self.adapter = model.adapter
        self.error = ""
        self.lock = threading.Lock()  # one generation at a time: the pipeline is shared
        # the page serves the PNG file itself: lossless, infotext inside (what `compare` writes for one cell)
        self.outputs = outputs or tempfile.mkdtemp(prefix="te_switch_page-")
        self.count = 0

    def family(self) -> str | None:
        return self.adapter.family(self.adapter.pipe)

    def choices(self, slot: str) -> list[str]:
        library = self.model.library
        if library is None:
            return []
        return [c.label for c in library.choices(KINDS_BY_SLOT[slot])]

    def choice_label(self, label: str) -> str:
        library = self.model.library
        choice = library.find(label) if library is not None else None
        return decorate(label, choice.tower) if choice else label

    def refresh(self) -> None:
        if self.model.library is not None:
            self.model.library.scan()

    def resting_clip_skip(self) -> int:
        family = self.family()
        towers = clip_towers(family) if family else ()
        return NATIVE_SKIP[family][towers[0]] if family and towers else 1

    def status(self) -> tuple[str, bool]:
        return (self.error, True) if self.error else ("", False)

    def hint(self, selection: Selection) -> str:
        budget = self.chunk_for(selection)
        return f"Long-CLIP-L: prompts are read in one chunk of {budget} tokens" if budget > 75 else ""

    def chunk_for(self, selection: Selection) -> int:
        """Tokens one chunk of the CLIP-L slot reads with ``selection``: 246 for a Long-CLIP-L, else 75."""
        wanted = selection.slot("clip_l").encoder
        library = self.model.library
        if wanted and library is not None and (choice := library.find(wanted)) is not None:
            return chunk_length(choice.tower.positions or 77)
        pipe = self.adapter.pipe
        slot = self.adapter.slots(pipe).get("clip_l")
        if wanted is None and slot is not None and self.adapter.engine.applied(slot) is not None:
            return chunk_length(77)  # Built-in comes back with the checkpoint's own 77 positions
        return self.adapter.token_budget("")[1] or chunk_length(77)

    def backend(self) -> PanelBackend:
        return PanelBackend(
            describe=self.adapter.describe,
            slot_names=self.adapter.slot_names,
            family=self.family,
            choices=self.choices,
            refresh=self.refresh,
            defaults=Selection,
            choice_label=self.choice_label,
            status=self.status,
            hint=self.hint,
            resting_clip_skip=self.resting_clip_skip,
            model_key=lambda: self.model.name,
        )

    # -- the page's own events ------------------------------------------------------------------

    def token_counter(self, prompt: str, *panel_values: Any) -> str:
        try:
            selection = selection_from_args(panel_values)
        except (ArgsError, ValueError):
            selection = Selection()
        count = self.adapter.token_budget(prompt or "")[0]
        budget = self.chunk_for(selection)
        css = "te-switch-tokens te-switch-over" if count > budget else "te-switch-tokens"
        return f"<span class='{css}'>{count}/{budget}</span>"

    def generate(
        self, prompt: str, negative: str, seed: float, steps: float, size: float, guidance: float, *panel_values: Any
    ) -> tuple[Any, str, str]:
        try:
            selection = selection_from_args(panel_values)
            with self.lock:
                result = generate(
                    self.adapter, selection, prompt or "", negative or "", seed=int(seed), steps=int(steps),
                    size=int(size), guidance=float(guidance), model_name=self.model.name,
                )  # fmt: skip
                self.count += 1
                path = save_result(result, os.path.join(self.outputs, f"{self.count:05d}-{int(seed)}.png"))
        except (TESwitchError, ArgsError, ValueError, OSError) as e:
            self.error = one_line(e)
            return None, "", f"error: {self.error}"
        self.error = ""
        t = result.timings
        line = f"swap {t['swap']:.3f} s · encode {t['encode']:.3f} s · generate {t['generate']:.2f} s"
        if result.warnings:
            line += " · " + "; ".join(result.warnings)
        return path, result.infotext, line

    def inspect_rows(self) -> list[list[str]]:
        library = self.model.library
        if library is None:
            return []
        rows = []
        for file in library.files:
            for tower in file.towers:
                row = tower_row(tower)
                row[0] = file.name
                rows.append([row[i] for i in INSPECT_COLUMNS])
        return rows


def build_page(model: Model, gr: Any = None, outputs: str | None = None) -> Any:
    """The page as a ``gr.Blocks`` (not launched); generated PNGs go to ``outputs`` (default: a temporary folder)."""
    if gr is None:
        import gradio as gr
    local = LocalBackend(model, outputs)
    page_outputs = local.outputs
    adapter = model.adapter
    family = adapter.family(adapter.pipe) or "unknown"
    side = _default_size(adapter)
    with gr.Blocks(title="TE Switch", **_blocks_css(gr)) as page:
        gr.Markdown(f"## TE Switch · {html.escape(model.name)} ({family.upper()}, diffusers)")
        if model.note:
            gr.Markdown(f"**{html.escape(model.note)}**", elem_id=elem_id("demo_note"))
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id=elem_id("prompt"))
                tokens = gr.HTML(value="<span class='te-switch-tokens'>0/75</span>", elem_id=elem_id("token_counter"))
                negative = gr.Textbox(label="Negative prompt", lines=2, elem_id=elem_id("negative"))
                with gr.Row():
                    seed = gr.Number(value=1, precision=0, label="Seed", elem_id=elem_id("seed"))
                    steps = gr.Slider(
                        1, 100, value=_default_steps(model), step=1, label="Steps", elem_id=elem_id("steps")
                    )
                with gr.Row():
                    size = gr.Slider(64, 2048, value=side, step=64, label="Size", elem_id=elem_id("size"))
                    guidance = gr.Slider(1, 20, value=7.0, step=0.5, label="CFG scale", elem_id=elem_id("guidance"))
                panel = build_panel(local.backend(), elem_id=elem_id, gr_module=gr)
                panel.accordion.open = True  # in a WebUI it folds away; here it is the point of the page
                generate = gr.Button("Generate", variant="primary", elem_id=elem_id("generate"))
            with gr.Column(scale=2):
                image = gr.Image(label="Image", interactive=False, elem_id=elem_id("image"), **_png_format(gr))
                infotext = gr.Textbox(label="Infotext", lines=4, interactive=False, elem_id=elem_id("infotext"))
                timing = gr.Markdown(elem_id=elem_id("timing"))
        with gr.Accordion("Encoder library (inspect)", open=False, elem_id=elem_id("library")):
            folders = ", ".join(model.library.folders) if model.library else "none: pass --encoders-dir DIR"
            gr.Markdown(f"Folders: {html.escape(folders)}")
            table = gr.Dataframe(
                headers=INSPECT_HEAD, value=local.inspect_rows() or None, interactive=False, elem_id=elem_id("inspect")
            )
            rescan = gr.Button("Rescan", elem_id=elem_id("rescan"))

        panel_inputs = panel.inputs()
        for event in (prompt.change, panel.encoders["clip_l"].change):
            event(fn=local.token_counter, inputs=[prompt, *panel_inputs], outputs=[tokens])
        generate.click(
            fn=local.generate,
            inputs=[prompt, negative, seed, steps, size, guidance, *panel_inputs],
            outputs=[image, infotext, timing],
        )
        rescan.click(fn=lambda: (local.refresh(), local.inspect_rows())[1], inputs=[], outputs=[table])
    page.te_switch_outputs = page_outputs  # type: ignore[attr-defined]  # launch() must allow serving it
    return page


def _png_format(gr: Any) -> dict[str, str]:
    """The file is served as written (a PNG path is never re-encoded); ``format`` covers arrays too."""
    import inspect

    return {"format": "png", "type": "filepath"} if "format" in inspect.signature(gr.Image.__init__).parameters else {}


def _blocks_css(gr: Any) -> dict[str, str]:
    """Gradio 4 takes ``css`` in ``Blocks``; 6 moved it to ``launch``."""
    import inspect

    return {"css": CSS} if "css" in inspect.signature(gr.Blocks.__init__).parameters else {}


def _launch_css(gr: Any) -> dict[str, str]:
    import inspect

    return {"css": CSS} if "css" in inspect.signature(gr.Blocks.launch).parameters and not _blocks_css(gr) else {}


def _default_size(adapter: Any) -> int:
    try:
        return default_size(adapter.pipe)[0]
    except (AttributeError, TypeError):
        return 512


def _default_steps(model: Model) -> int:
    return DEMO_STEPS if model.is_demo else 20


def main(args: Any) -> int:
    """The ``ui`` subcommand."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local page
    import gradio as gr

    model = open_model(args.model, args.config, args.encoders_dir or [])
    page = build_page(model, gr)
    port = args.port or free_port(args.host)
    print(f"TE Switch page for {model.name}: http://{args.host}:{port}", file=sys.stderr, flush=True)
    if model.is_demo:
        print(f"note: {model.note}", file=sys.stderr, flush=True)
    page.queue().launch(
        server_name=args.host,
        server_port=port,
        show_error=True,
        inbrowser=False,
        quiet=True,
        allowed_paths=[page.te_switch_outputs],
        **_launch_css(gr),
    )
    return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (``--port 0``)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
