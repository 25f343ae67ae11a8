"""Fake: the parsed command line (only the flags the extension reads)."""

import argparse

parser = argparse.ArgumentParser()
cmd_opts = argparse.Namespace(
    freeze_settings=False,
    freeze_settings_in_sections=None,
    freeze_specific_settings=None,
    hide_ui_dir_config=False,
    nowebui=False,
    api=True,
    skip_install=False,
    api_auth=None,
    te_switch_dir=[],
    lora_dir=None,  # real: the Lora extension's preload.py adds --lora-dir (default models/Lora)
    te_switch_precision=None,
    no_half=False,
    lowvram=False,
    medvram=False,
)
