"""Fake of backend/args.py: the parsed flags the text-encoder code reads, and ``dynamic_args``."""

import argparse

args = argparse.Namespace(
    always_gpu=False,
    clip_in_fp8_e4m3fn=False,
    clip_in_fp8_e5m2=False,
    clip_in_fp16=False,
    clip_in_fp32=False,
)

dynamic_args = {
    "embedding_dir": None,
    "emphasis_name": "Original",
    "forge_unet_storage_dtype": None,
    "online_lora": False,
}
