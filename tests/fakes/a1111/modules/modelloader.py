"""Fake of modules/modelloader.py: ``load_file_from_url`` (SD3's missing encoders come through it).

The real one downloads into ``model_dir`` unless the file is already there; tests never download,
so a missing file is an error here.
"""

from __future__ import annotations

import os


def load_file_from_url(
    url: str,
    *,
    model_dir: str,
    progress: bool = True,
    file_name: str | None = None,
    hash_prefix: str | None = None,
) -> str:
    os.makedirs(model_dir, exist_ok=True)
    cached = os.path.join(model_dir, file_name or os.path.basename(url))
    if not os.path.exists(cached):
        raise FileNotFoundError(f"fake A1111 does not download: {cached} is missing (would fetch {url})")
    return os.path.abspath(cached)
