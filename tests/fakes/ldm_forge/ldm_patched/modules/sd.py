"""Fake of ldm_patched/modules/sd.py: the ``CLIP`` object (encoder holder + ``ModelPatcher`` + tokenizer)
and ``load_lora_for_models`` (a clone with the LoRA's patches added)."""

from ldm_patched.modules import model_management, model_patcher


class CLIP:
    def __init__(self, target=None, embedding_directory=None, no_init=False, tokenizer_data={}, parameters=0,  # noqa: B006
                 model_options={}):  # noqa: B006  # fmt: skip
        if no_init:
            return
        load_device = model_management.text_encoder_device()
        offload_device = model_management.text_encoder_offload_device()
        dtype = model_options.get("dtype") or model_management.text_encoder_dtype(load_device)
        self.cond_stage_model = target.clip(dtype=dtype, device=offload_device, model_options=model_options)
        self.tokenizer = target.tokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
        self.patcher = model_patcher.ModelPatcher(self.cond_stage_model, load_device=load_device,
                                                  offload_device=offload_device)  # fmt: skip
        self.patcher.is_clip = True
        if load_device == offload_device:
            model_management.load_models_gpu([self.patcher], force_full_load=True)
        self.layer_idx = None

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        n.tokenizer = self.tokenizer
        n.layer_idx = self.layer_idx
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def load_sd(self, sd, full_model=False):
        if full_model:
            return self.cond_stage_model.load_state_dict(_live_spelling(sd, self.cond_stage_model), strict=False)
        return self.cond_stage_model.load_sd(sd)


def _live_spelling(sd, model):
    """The hosts' conversions write ``transformer.text_model.*`` (they pin transformers 4.x); transformers
    >= 5.6 has no ``text_model`` level, so the fake drops it there (strict=False would skip those keys)."""
    live = model.state_dict().keys()
    out = {}
    for key, value in sd.items():
        short = key.replace(".transformer.text_model.", ".transformer.", 1)
        out[short if key not in live and short in live else key] = value
    return out


def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename="default"):
    """``lora``: cond_stage_model key -> weight delta (the fake's already-converted LoRA)."""
    new_clip = clip.clone()
    new_clip.add_patches(lora, strength_clip)
    return model, new_clip
