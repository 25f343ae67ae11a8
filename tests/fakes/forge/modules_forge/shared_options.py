"""Fake: Forge's own options (modules_forge/shared_options.py + the Forge-only entries of
modules/shared_options.py), added to the common fake ``shared.opts`` with Forge's defaults."""

from modules import shared
from modules.options import OptionInfo

FORGE_OPTIONS = {
    "forge_unet_storage_dtype": OptionInfo("Automatic"),
    "forge_preset": OptionInfo("sd"),
    "forge_additional_modules": OptionInfo([]),
    "sdxl_crop_top": OptionInfo(0, "crop top coordinate"),
    "sdxl_crop_left": OptionInfo(0, "crop left coordinate"),
    "sd3_enable_t5": OptionInfo(False, "Enable T5"),
    "use_old_scheduling": OptionInfo(
        False, "Use old prompt editing timelines.", infotext="Old prompt editing timelines"
    ),
    "fp8_storage": OptionInfo("Disable", "FP8 weight"),
    "cache_fp16_weight": OptionInfo(False, "Cache FP16 weight for LoRA"),
}


def register():
    for key, info in FORGE_OPTIONS.items():
        if key not in shared.opts.data_labels:
            shared.opts.add_option(key, info)
    # Forge labels the clip skip option "(Managed by Forge)" and keeps it out of Settings
    shared.opts.data_labels["CLIP_stop_at_last_layers"].label = "(Managed by Forge)"


register()
