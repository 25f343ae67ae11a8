"""The WebUI's panel wiring: which callbacks the shared panel (``webui.ui.build_panel``) gets on A1111/Forge.

Its own module because it joins the live-host helpers (``runtime``) with the recommendation, which reads
the live host through ``runtime`` itself.
"""

from __future__ import annotations

from te_switch.core.selection import Selection
from te_switch.webui import library, options, recommend, runtime
from te_switch.webui.ui import PanelBackend


def panel_backend() -> PanelBackend:
    """The WebUI's tab panel callbacks: the live host (runtime), the encoder library, the settings and the
    per-model recommendation."""
    return PanelBackend(
        describe=runtime.describe,
        slot_names=runtime.slot_names,
        family=runtime.family,
        choices=library.labels_for,
        refresh=library.refresh,
        defaults=Selection,  # neutral: the global options apply (see te_switch.webui.args)
        choice_label=library.display_label,
        status=runtime.status_line,
        hint=runtime.long_clip_hint,
        resting_clip_skip=runtime.resting_clip_skip,
        model_key=runtime.checkpoint_key,
        remembered=runtime.remembered_panel,
        recommend=recommend.for_panel,
        explain=recommend.explanation,
        use_label=recommend.use_label,
        global_clip_skip=options.global_clip_skip,
        set_global_clip_skip=options.set_global_clip_skip,
    )
