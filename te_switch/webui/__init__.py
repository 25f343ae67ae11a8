"""WebUI glue shared by A1111 1.10 and Forge 2 (see docs/ARCHITECTURE.md).

``args`` (script arguments, levels) · ``ui`` (the panel builder, also used by the standalone page) ·
``options`` (settings) · ``library`` (encoder folders and lookups) · ``sources`` (a generation's
resolved encoders) · ``labels`` (the dropdown's decoration) · ``runtime`` (host, status line) ·
``script`` (the AlwaysVisible script) · ``infotext`` · ``xyz`` · ``api`` (REST routes, request checks) ·
``memory`` (per-checkpoint) · ``entry`` (registration, called by ``scripts/te_switch.py``).
Nothing here imports ``modules.*`` at import time, so the package imports without a WebUI.
"""
