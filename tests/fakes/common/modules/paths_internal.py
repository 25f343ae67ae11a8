"""Fake: WebUI folders. Tests point ``models_path`` at a tmp dir through shared/paths."""

import os
import tempfile

script_path = os.path.join(tempfile.gettempdir(), "te_switch_fake_webui")
data_path = script_path
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
