"""Fake: the A1111 options and command-line flags the fake A1111 modules read, beyond what the
shared fake (``tests/fakes/common/modules/shared.py``) defines. Real defaults and option names
(A1111 1.10.1 ``modules/shared_options.py`` / ``cmd_args.py``); imported by the fakes that need them.
"""

from modules import shared
from modules.options import OptionInfo

A1111_OPTIONS = {
    "use_old_emphasis_implementation": OptionInfo(False, "Use old emphasis implementation"),
    "textual_inversion_add_hashes_to_infotext": OptionInfo(True, "Add TI hashes to infotext"),
    "use_old_scheduling": OptionInfo(False, "Use old prompt editing timelines"),
    "sdxl_crop_top": OptionInfo(0, "crop top coordinate"),
    "sdxl_crop_left": OptionInfo(0, "crop left coordinate"),
    "sdxl_refiner_low_aesthetic_score": OptionInfo(2.5, "SDXL low aesthetic score"),
    "sdxl_refiner_high_aesthetic_score": OptionInfo(6.0, "SDXL high aesthetic score"),
    "fp8_storage": OptionInfo("Disable", "FP8 weight"),
    "cache_fp16_weight": OptionInfo(False, "Cache FP16 weight for LoRA"),
    "sd3_enable_t5": OptionInfo(False, "Enable T5"),
    "sd_checkpoint_cache": OptionInfo(0, "Checkpoints to cache in RAM"),
    "sd_checkpoints_limit": OptionInfo(1, "Maximum number of checkpoints loaded at the same time"),
    "sd_checkpoints_keep_in_cpu": OptionInfo(True, "Only keep one model on device"),
    "hires_fix_use_firstpass_conds": OptionInfo(
        False, "For hires fix, calculate conds of second pass using extra networks of first pass."
    ),
}
for _key, _info in A1111_OPTIONS.items():
    if _key not in shared.opts.data_labels:
        shared.opts.add_option(_key, _info)

A1111_FLAGS = {
    "medvram_sdxl": False,
    "no_half_vae": False,
    "upcast_sampling": False,
    "opt_channelslast": False,
    "precision": "autocast",
    "embeddings_dir": None,
}
for _flag, _value in A1111_FLAGS.items():
    if not hasattr(shared.cmd_opts, _flag):
        setattr(shared.cmd_opts, _flag, _value)

if not hasattr(shared, "ldm_print"):
    shared.ldm_print = print
