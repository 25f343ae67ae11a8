"""The model the standalone tools work on: a diffusers pipeline, its adapter and the encoder library."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from te_switch.core.errors import TESwitchError
from te_switch.core.library import EncoderLibrary
from te_switch.hosts.diffusers import DiffusersAdapter
from te_switch.standalone import demo
from te_switch.standalone.cache import cache_root
from te_switch.standalone.pipeline import load_pipeline
from te_switch.standalone.resolver import EncoderResolver


@dataclass
class Model:
    """An opened model: the adapter over its pipeline, and what to tell users about it."""

    adapter: DiffusersAdapter
    name: str
    is_demo: bool
    note: str = ""
    library: EncoderLibrary | None = None

    @property
    def resolver(self) -> EncoderResolver:
        return self.adapter.resolver  # type: ignore[return-value]


def open_model(model: str | None = None, config: str | None = None, encoder_dirs: Sequence[str] = ()) -> Model:
    """``model`` (a diffusers folder, or a single file with ``config``), or the built-in demo when None."""
    folders = [os.path.abspath(d) for d in encoder_dirs]
    for folder in folders:
        if not os.path.isdir(folder):
            raise TESwitchError(f"--encoders-dir {folder}: no such folder")
    if model is None:
        started = time.perf_counter()
        fresh = not os.path.isdir(demo.demo_dir())
        if fresh:
            print(f"creating the demo model in {demo.demo_dir()} (once) ...", file=sys.stderr, flush=True)
        the_demo = demo.ensure_demo()
        if fresh:
            size = demo.folder_size(the_demo.root) / 1e6
            print(f"demo ready: {size:.0f} MB in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        pipe = demo.load_demo_pipeline(the_demo)
        library = EncoderLibrary([the_demo.encoders, *folders], cache_file=library_cache())
        adapter = DiffusersAdapter(pipe, EncoderResolver(library))
        return Model(adapter, demo.DEMO_MODEL_NAME, True, demo.NOTE, library)
    pipe = load_pipeline(model, config=config)
    pipe.set_progress_bar_config(disable=True)
    library = EncoderLibrary(folders, cache_file=library_cache()) if folders else None
    name = os.path.basename(os.path.normpath(model))
    return Model(DiffusersAdapter(pipe, EncoderResolver(library)), name, False, "", library)


def library_cache() -> str:
    return os.path.join(cache_root(), "library.json")
