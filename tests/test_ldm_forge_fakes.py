"""The reForge and Forge Classic fakes keep the hosts' names: every function/method the adapter and its tests
rely on has the same parameters as in the real source (read with ``ast``, never imported).

Set ``TE_SWITCH_REFORGE_SRC`` to a reForge checkout (Panchovix/stable-diffusion-webui-reForge, ``main``) and
``TE_SWITCH_FORGE_CLASSIC_SRC`` to a Forge Classic one (Haoming02/sd-webui-forge-classic, ``classic``);
each host's checks are skipped without its variable.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_forge_fakes import _class_attrs, _defs, _params

FAKES = Path(__file__).parent / "fakes"
SHARED = ("ldm_forge", "a1111")  # the trees both hosts' fakes are layered over (tests/fakes/harness.py)
COMMON = {
    "modules_forge/forge_clip.py": [
        "move_clip_to_gpu",
        "CLIP_SD_15_L.encode_with_transformers",
        "CLIP_SD_21_H.__init__",
        "CLIP_SD_21_H.encode_with_transformers",
        "CLIP_SD_XL_L.__init__",
        "CLIP_SD_XL_L.encode_with_transformers",
        "CLIP_SD_XL_G.__init__",
        "CLIP_SD_XL_G.encode_with_transformers",
    ],
    "modules_forge/forge_loader.py": ["FakeObject.__init__", "no_clip", "load_model_for_a1111"],
    "modules/sd_hijack.py": ["EmbeddingsWithFixes.__init__", "EmbeddingsWithFixes.forward"],
    "modules/sd_hijack_clip.py": [
        "FrozenCLIPEmbedderWithCustomWordsBase.__init__",
        "FrozenCLIPEmbedderWithCustomWords.__init__",
        "FrozenCLIPEmbedderWithCustomWords.tokenize",
    ],
    "ldm_patched/modules/ops.py": ["use_patched_ops", "cast_bias_weight"],
    "ldm_patched/modules/model_patcher.py": ["ModelPatcher.clone", "ModelPatcher.is_clone", "ModelPatcher.add_patches"],
    "ldm_patched/modules/model_management.py": [
        "load_models_gpu",
        "load_model_gpu",
        "text_encoder_device",
        "text_encoder_offload_device",
        "text_encoder_dtype",
        "soft_empty_cache",
        "unload_all_models",
    ],
    "modules/processing.py": ["StableDiffusionProcessing.cached_params"],
    "modules/sd_models.py": ["SdModelData.__init__", "SdModelData.set_sd_model", "get_empty_cond"],
}
HOSTS = {
    "reforge": (
        "TE_SWITCH_REFORGE_SRC",
        {
            **COMMON,
            "modules_forge/forge_clip.py": [*COMMON["modules_forge/forge_clip.py"], "CLIP_SD_15_L.__init__"],
            "ldm_patched/modules/sd1_clip.py": [
                "SDClipModel.__init__",
                "SD1ClipModel.__init__",
                "SDTokenizer.__init__",
            ],
            "ldm_patched/modules/sd.py": ["CLIP.__init__", "CLIP.clone", "CLIP.add_patches", "load_lora_for_models"],
            "ldm_patched/modules/model_patcher.py": [
                *COMMON["ldm_patched/modules/model_patcher.py"],
                "ModelPatcher.__init__",
                "ModelPatcher.patch_weight_to_device",
                "ModelPatcher.patch_model",
                "ModelPatcher.unpatch_model",
                "ModelPatcher.detach",
            ],
            "ldm_patched/modules/model_management.py": [
                *COMMON["ldm_patched/modules/model_management.py"],
                "LoadedModel.__init__",
                "LoadedModel.model_load",
                "LoadedModel.model_unload",
            ],
            "modules_forge/forge_loader.py": [
                *COMMON["modules_forge/forge_loader.py"],
                "load_checkpoint_guess_config",
                "maybe_override_text_encoder",
                "ForgeSD.__init__",
            ],
            "modules/sd_models.py": [*COMMON["modules/sd_models.py"], "load_model", "reload_model_weights"],
            "modules/sd_text_encoder.py": [
                "TextEncoderInfo",
                "CheckpointTextEncoderOption.__init__",
                "get_text_encoder_option",
            ],
        },
    ),
    "forge_classic": (
        "TE_SWITCH_FORGE_CLASSIC_SRC",
        {
            **COMMON,
            "ldm_patched/modules/model_management.py": [
                *COMMON["ldm_patched/modules/model_management.py"],
                "LoadedModel.__init__",
                "LoadedModel.model_load",
                "LoadedModel.model_unload",
            ],
            "modules/sd_models.py": [*COMMON["modules/sd_models.py"], "reload_model_weights"],
        },
    ),
}
CLASS_LISTS = {
    "modules/processing.py": {
        "StableDiffusionProcessing": ("cached_c", "cached_uc"),
        "StableDiffusionProcessingTxt2Img": ("cached_hr_c", "cached_hr_uc"),
    }
}
CASES = [(host, rel) for host, (_, checked) in HOSTS.items() for rel in sorted(checked)]


def _fake(host: str, rel: str) -> Path:
    """The file the harness resolves for ``rel``: the host's own tree first, then the shared ones."""
    for tree in (host, *SHARED, "common"):
        path = FAKES / tree / rel
        if path.is_file():
            return path
    raise AssertionError(f"no fake provides {rel} for {host}")


@pytest.mark.parametrize(("host", "rel"), CASES, ids=[f"{h}:{r}" for h, r in CASES])
def test_fake_signatures_match_the_host(host: str, rel: str) -> None:
    variable, checked = HOSTS[host]
    source = os.environ.get(variable)
    if not source:
        pytest.skip(f"set {variable} to a {host} checkout to compare the fakes with its source")
    real_path = Path(source) / rel
    assert real_path.is_file(), f"{real_path} does not exist ({variable} must name the WebUI's root folder)"
    fake, real = _defs(_fake(host, rel)), _defs(real_path)
    for name in checked[rel]:
        assert name in real, f"{rel}: {host} has no {name} (update the fake list)"
        assert name in fake, f"{rel}: the fake lacks {name}"
        if not name[0].isupper() or "." in name:  # functions and methods; a bare class name only has to exist
            assert _params(fake[name]) == _params(real[name]), f"{host} {rel}:{name}"
    for cls, attrs in CLASS_LISTS.get(rel, {}).items():
        for attr in attrs:
            assert attr in _class_attrs(real[cls]), f"{rel}: {host}'s {cls} has no {attr}"
            assert attr in _class_attrs(fake[cls]), f"{rel}: the fake {cls} lacks {attr}"
