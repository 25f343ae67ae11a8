"""Fake of reForge's modules/sd_text_encoder.py: the "Text Encoder" setting's options (whole checkpoints
whose encoders replace the loaded checkpoint's at load time) and what is in force."""

import os
from dataclasses import dataclass

from modules import shared

text_encoder_options = []
current_text_encoder_option = None
current_text_encoder = None


@dataclass
class TextEncoderInfo:
    filename: str
    title: str
    model_name: str


class CheckpointTextEncoderOption:
    def __init__(self, te_info):
        self.te_info = te_info
        self.model_name = te_info.model_name
        self.label = te_info.title


def add_option(filename):
    """Test helper standing in for ``list_text_encoders`` (which scans models/ folders)."""
    name = os.path.splitext(os.path.basename(filename))[0]
    text_encoder_options.append(CheckpointTextEncoderOption(TextEncoderInfo(filename, f"TE: {name}", name)))


def get_text_encoder_option(option=None):
    option = option or getattr(shared.opts, "sd_text_encoder", "Automatic")
    if option == "None":
        return None
    if option == "Automatic":
        model = shared.sd_model
        name = getattr(getattr(model, "sd_checkpoint_info", None), "model_name", None)
        return next((x for x in text_encoder_options if x.model_name == name), None)
    return next((x for x in text_encoder_options if x.label == option), None)
