"""TE Switch without a WebUI, on diffusers: ``python -m te_switch`` (see :mod:`te_switch.standalone.cli`).

``cli`` (the commands) · ``table`` (the inspect table) · ``model`` (open a model or the demo) ·
``pipeline`` (load a diffusers pipeline offline, the built-in SD1.5 config) · ``resolver`` (encoder
names and paths -> files) · ``generate`` (one image with its infotext) · ``compare`` (the grid) ·
``page`` (the local Gradio page) · ``demo`` (the tiny built-in model) · ``tokenizers`` (CLIP's
tokenizer made offline) · ``cache`` (where all of it is kept).

This wing sits on top: it may import the core, the hosts (the diffusers adapter) and the WebUI glue's
host-free panel (``webui.ui``, ``webui.args``, ``webui.library``); nothing below imports it.
"""
