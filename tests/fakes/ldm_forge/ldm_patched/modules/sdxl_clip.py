"""Fake of ldm_patched/modules/sdxl_clip.py: SDXL's CLIP-L (hidden, -2, no LN) and CLIP-G holders."""

import torch

from ldm_patched.modules import sd1_clip


class SDXLClipG(sd1_clip.SDClipModel):
    def __init__(self, device="cpu", max_length=77, freeze=True, layer="penultimate", layer_idx=None, dtype=None,
                 model_options={}):  # noqa: B006  # fmt: skip
        if layer == "penultimate":
            layer = "hidden"
            layer_idx = -2
        super().__init__(device=device, freeze=freeze, layer=layer, layer_idx=layer_idx, textmodel_json_config="clip_g",
                         dtype=dtype, special_tokens={"start": 49406, "end": 49407, "pad": 0},
                         layer_norm_hidden_state=False, return_projected_pooled=True, model_options=model_options)  # fmt: skip


class SDXLClipGTokenizer(sd1_clip.SDTokenizer):
    def __init__(self, tokenizer_path=None, embedding_directory=None, tokenizer_data={}):  # noqa: B006
        super().__init__(tokenizer_path, pad_with_end=False, embedding_directory=embedding_directory,
                         embedding_size=1280, embedding_key="clip_g", tokenizer_data=tokenizer_data)  # fmt: skip


class SDXLTokenizer:
    def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006
        self.clip_l = sd1_clip.SDTokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
        self.clip_g = SDXLClipGTokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)


class SDXLClipModel(torch.nn.Module):
    def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
        super().__init__()
        self.clip_l = sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                           layer_norm_hidden_state=False, model_options=model_options)  # fmt: skip
        self.clip_g = SDXLClipG(device=device, dtype=dtype, model_options=model_options)
        self.dtypes = {dtype} if dtype is not None else set()


class SDXLRefinerClipModel(sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
        super().__init__(device=device, dtype=dtype, clip_name="g", clip_model=SDXLClipG, model_options=model_options)
