"""Fake of modules/shared.py: the globals extensions read (opts, cmd_opts, models_path, sd_model).

Built-in options are the ones the extension reads or writes, with their real defaults and
infotext names; ``options_templates`` is where extensions register at import time.
"""

import os

from modules import options, shared_cmd_options
from modules.paths_internal import data_path, models_path, script_path  # noqa: F401

OptionInfo = options.OptionInfo
OptionHTML = options.OptionHTML
options_section = options.options_section

cmd_opts = shared_cmd_options.cmd_opts
parser = shared_cmd_options.parser
config_filename = os.path.join(data_path, "config.json")  # real: cmd_opts.ui_settings_file

options_templates: dict = {}
options_templates.update(
    options_section(
        ("sd", "Stable Diffusion", "sd"),
        {
            "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint", infotext="Model hash"),
            "sdxl_clip_l_skip": OptionInfo(False, "Clip skip SDXL"),
            "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip", infotext="Clip skip"),
            "emphasis": OptionInfo("Original", "Emphasis mode", infotext="Emphasis"),
            "comma_padding_backtrack": OptionInfo(20, "Prompt word wrap length limit"),
        },
    )
)
options_templates.update(
    options_section(
        ("ui", "User interface", "ui"),
        {
            "quicksettings_list": OptionInfo(["sd_model_checkpoint"], "Quicksettings list"),
            "localization": OptionInfo("None", "Localization"),
        },
    )
)
options_templates.update(
    options_section(
        ("optimizations", "Optimizations", "sd"),
        {
            "persistent_cond_cache": OptionInfo(True, "Persistent cond cache"),
        },
    )
)

opts = options.Options(options_templates, set())
sd_model = None
settings_components: dict = {}
demo = None


class _State:
    job = ""
    time_start = None
    interrupted = False
    skipped = False
    stopping_generation = False
    job_count = 0

    def begin(self, job="(unknown)"):
        import time

        self.job = job
        self.time_start = time.time()
        self.interrupted = False  # real State.begin resets the flags of the previous job
        self.skipped = False
        self.stopping_generation = False

    def end(self):
        self.job = ""

    def interrupt(self):
        self.interrupted = True


state = _State()
