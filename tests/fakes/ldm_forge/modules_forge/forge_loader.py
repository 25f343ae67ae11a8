"""Fake of modules_forge/forge_loader.py: ``load_model_for_a1111`` as both ldm_patched Forges do it.

The A1111 config is instantiated with ``no_clip()`` (the ldm/sgm embedders get no encoder of their own),
the ComfyUI ``CLIP`` is built from the checkpoint (keys converted as ``supported_models`` does: SD1
``cond_stage_model.transformer.*`` → ``clip_l.transformer.*``; SDXL ``conditioner.embedders.0.transformer.*``
→ ``clip_l.transformer.*`` and ``conditioner.embedders.1.model.*`` → ``clip_g.*`` through
``clip_text_transformers_convert``, the projection transposed back into the raw ``clip_g.text_projection``),
then the wrappers are wired: ``embedder.transformer`` = the CLIP's HF module, its token embedding wrapped
in ``EmbeddingsWithFixes``, the embedder wrapped in ``forge_clip.CLIP_SD_*``. The UNet/VAE are not faked.
"""

import contextlib

import fake_thirdparty
import ldm_patched.modules.utils as utils
import torch
from ldm_patched.modules import sd1_clip, sdxl_clip
from ldm_patched.modules.sd import CLIP
from modules import sd_hijack, sd_models_config
from modules.sd_models_xl import extend_sdxl
from modules_forge import forge_clip


class FakeObject:
    def __init__(self, *args, **kwargs):
        super().__init__()
        self.visual = None

    def eval(self, *args, **kwargs):
        return self

    def parameters(self, *args, **kwargs):
        return []


class ForgeSD:
    def __init__(self, unet, clip, vae, clipvision):
        self.unet = unet
        self.clip = clip
        self.vae = vae
        self.clipvision = clipvision

    def shallow_copy(self):
        return ForgeSD(self.unet, self.clip, self.vae, self.clipvision)


@contextlib.contextmanager
def no_clip():
    saved = (fake_thirdparty.create_model_and_transforms, fake_thirdparty.clip_text_model)
    try:
        fake_thirdparty.create_model_and_transforms = lambda *args, **kwargs: (FakeObject(), None, None)
        fake_thirdparty.clip_text_model = lambda *args, **kwargs: FakeObject()
        yield
    finally:
        fake_thirdparty.create_model_and_transforms, fake_thirdparty.clip_text_model = saved


class _Target:
    def __init__(self, tokenizer, clip):
        self.tokenizer = tokenizer
        self.clip = clip
        self.params = {}


def _clip_target(state_dict):
    if any(k.startswith("conditioner.embedders.1.model.") for k in state_dict):
        return _Target(sdxl_clip.SDXLTokenizer, sdxl_clip.SDXLClipModel), {
            "conditioner.embedders.0.transformer.": "clip_l.transformer.",
            "conditioner.embedders.1.model.": "clip_g.",
        }
    if any(k.startswith("conditioner.embedders.0.model.") for k in state_dict):
        return _Target(sdxl_clip.SDXLTokenizer, sdxl_clip.SDXLRefinerClipModel), {
            "conditioner.embedders.0.model.": "clip_g."
        }
    return _Target(sd1_clip.SD1Tokenizer, sd1_clip.SD1ClipModel), {"cond_stage_model.": "clip_l."}


def process_clip_state_dict(state_dict, replace_prefix):
    sd = utils.state_dict_prefix_replace(dict(state_dict), replace_prefix, filter_keys=True)
    if any(k.startswith("clip_g.transformer.resblocks") for k in sd):
        sd = utils.clip_text_transformers_convert(sd, "clip_g.", "clip_g.transformer.")
        if "clip_g.transformer.text_projection.weight" in sd:
            sd["clip_g.text_projection"] = sd.pop("clip_g.transformer.text_projection.weight").transpose(0, 1)
    return sd


def load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True, output_clipvision=False,
                                 embedding_directory=None, output_model=True, model_options={},  # noqa: B006
                                 te_model_options={}):  # noqa: B006  # fmt: skip
    clip = None  # ckpt: a state dict here (the real one also takes a path)
    if output_clip:
        target, prefixes = _clip_target(ckpt)
        clip = CLIP(target, embedding_directory=embedding_directory)
        clip.load_sd(process_clip_state_dict(ckpt, prefixes), full_model=True)
    return ForgeSD(None, clip, None, None)


def _wire(embedder, clip_holder, tokenizer, wrapper_cls, key="clip_l"):
    embedder.tokenizer = tokenizer
    embedder.transformer = clip_holder.transformer
    embeddings = sd1_clip.fake_thirdparty_text_model(embedder.transformer).embeddings
    embeddings.token_embedding = sd_hijack.EmbeddingsWithFixes(
        embeddings.token_embedding, sd_hijack.model_hijack, textual_inversion_key=key
    )
    return wrapper_cls(embedder, sd_hijack.model_hijack)


@torch.no_grad()
def load_model_for_a1111(timer, checkpoint_info=None, state_dict=None):
    from modules import sd_models

    config = sd_models_config.find_checkpoint_config(state_dict, checkpoint_info)
    with no_clip():
        sd_model = sd_models.instantiate_from_config(config)
    forge_objects = load_checkpoint_guess_config(state_dict, embedding_directory=None)
    forge_objects = maybe_override_text_encoder(forge_objects, checkpoint_info)
    sd_model.forge_objects = forge_objects
    sd_model.forge_objects_original = forge_objects.shallow_copy()
    sd_model.forge_objects_after_applying_lora = forge_objects.shallow_copy()
    if getattr(forge_objects, "_separate_te_loaded", False):
        sd_model._separate_te_loaded = True
    clip = forge_objects.clip
    conditioner = getattr(sd_model, "conditioner", None)
    if conditioner:
        text_cond_models = []
        for i, embedder in enumerate(conditioner.embedders):
            typename = type(embedder).__name__
            if typename == "FrozenCLIPEmbedder":
                embedder = _wire(embedder, clip.cond_stage_model.clip_l, clip.tokenizer.clip_l.tokenizer,
                                 forge_clip.CLIP_SD_XL_L)  # fmt: skip
            elif typename == "FrozenOpenCLIPEmbedder2":
                embedder.text_projection = clip.cond_stage_model.clip_g.text_projection
                embedder = _wire(embedder, clip.cond_stage_model.clip_g, clip.tokenizer.clip_g.tokenizer,
                                 forge_clip.CLIP_SD_XL_G, "clip_g")  # fmt: skip
            else:
                continue
            conditioner.embedders[i] = embedder
            text_cond_models.append(embedder)
        sd_model.cond_stage_model = text_cond_models[0] if len(text_cond_models) == 1 else conditioner
        sd_model.is_sdxl = True
        extend_sdxl(sd_model)
    else:
        sd_model.cond_stage_model = _wire(sd_model.cond_stage_model, clip.cond_stage_model.clip_l,
                                          clip.tokenizer.clip_l.tokenizer, forge_clip.CLIP_SD_15_L)  # fmt: skip
        sd_model.is_sdxl = False
    sd_model.is_sd2 = False
    sd_model.is_sd1 = not sd_model.is_sdxl
    sd_model.sd_checkpoint_info = checkpoint_info
    sd_model.sd_model_checkpoint = checkpoint_info.filename
    sd_model.current_lora_hash = str([])
    return sd_model


def maybe_override_text_encoder(forge_objects, checkpoint_info):
    """reForge's "Text Encoder" setting: another checkpoint's encoders (Forge Classic has no such setting)."""
    try:
        from modules import sd_text_encoder
    except ImportError:
        return forge_objects
    option = sd_text_encoder.get_text_encoder_option()
    if option is None or option.te_info.filename == checkpoint_info.filename:
        return forge_objects
    from safetensors.torch import load_file

    forge_objects.clip = load_checkpoint_guess_config(load_file(option.te_info.filename)).clip
    forge_objects._separate_te_loaded = True
    sd_text_encoder.current_text_encoder_option = option
    return forge_objects
