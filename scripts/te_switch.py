"""TE Switch for AUTOMATIC1111 / Forge: CLIP Skip on every model and text-encoder swaps.

The WebUI imports this file with the extension folder on ``sys.path``; everything lives in the
``te_switch`` package. The script class is imported into this module's namespace, which is how the
WebUI finds it.
"""

from te_switch.webui import entry
from te_switch.webui.script import TESwitchScript

entry.register()

__all__ = ["TESwitchScript"]
