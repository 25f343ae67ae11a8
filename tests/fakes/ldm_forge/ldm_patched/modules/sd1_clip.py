"""Fake of ldm_patched/modules/sd1_clip.py: ``SDClipModel`` holds a transformers ``CLIPTextModel`` built
under ``use_patched_ops(manual_cast)`` (casting Linear/LayerNorm), cast to the text-encoder dtype with the
embeddings kept fp32, plus a raw ``text_projection`` (identity until a checkpoint fills it) and
``logit_scale``. Configs: real depths, small widths (``fake_thirdparty``). The ComfyUI encode path
(``encode_token_weights``) is not faked: the A1111 wrappers encode through ``transformer`` directly."""

import contextlib

import fake_thirdparty
import torch
from transformers import CLIPTextModel, modeling_utils

import ldm_patched.modules.ops

CONFIGS = {"clip_l": {}, "clip_g": fake_thirdparty.OPENCLIP_ARCHS["ViT-bigG-14"]}


def clip_config(name):
    if name == "clip_l":
        return fake_thirdparty.clip_text_config()
    arch = CONFIGS[name]
    return fake_thirdparty.clip_text_config(
        hidden_size=arch["width"],
        intermediate_size=4 * arch["width"],
        num_hidden_layers=arch["layers"],
        num_attention_heads=arch["heads"],
        hidden_act="gelu",
        projection_dim=arch["embed_dim"],
    )


class SDClipModel(torch.nn.Module):
    LAYERS = ["last", "pooled", "hidden", "all"]  # noqa: RUF012

    def __init__(
        self,
        device="cpu",
        max_length=77,
        freeze=True,
        layer="last",
        layer_idx=None,
        textmodel_json_config=None,
        dtype=None,
        model_class=None,
        special_tokens={"start": 49406, "end": 49407, "pad": 49407},  # noqa: B006 (the real signature)
        layer_norm_hidden_state=True,
        enable_attention_masks=False,
        zero_out_masked=False,
        return_projected_pooled=True,
        return_attention_masks=False,
        model_options={},  # noqa: B006
    ):
        super().__init__()
        config = clip_config(textmodel_json_config or "clip_l")
        self.num_layers = config.num_hidden_layers
        # transformers 5 moved no_init_weights; the weights come from the checkpoint either way
        no_init = getattr(modeling_utils, "no_init_weights", contextlib.nullcontext)
        with ldm_patched.modules.ops.use_patched_ops(ldm_patched.modules.ops.manual_cast), no_init():
            self.transformer = CLIPTextModel(config)
        if dtype is not None:
            self.transformer.to(dtype)
        fake_thirdparty_text_model(self.transformer).embeddings.to(torch.float32)
        self.max_length = max_length
        self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False
        self.layer = layer
        self.layer_idx = layer_idx
        self.special_tokens = special_tokens
        self.text_projection = torch.nn.Parameter(torch.eye(self.transformer.get_input_embeddings().weight.shape[1]))
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6055))
        self.layer_norm_hidden_state = layer_norm_hidden_state
        self.return_projected_pooled = return_projected_pooled

    def load_sd(self, sd):
        return self.transformer.load_state_dict(sd, strict=False)


def fake_thirdparty_text_model(transformer):
    return getattr(transformer, "text_model", transformer)  # transformers >= 5.6 has no text_model level


class SDTokenizer:
    def __init__(self, tokenizer_path=None, max_length=77, pad_with_end=True, embedding_directory=None,
                 embedding_size=768, embedding_key="clip_l", tokenizer_class=None, has_start_token=True,
                 pad_to_max_length=True, min_length=None, pad_token=None, min_padding=None, tokenizer_data={},  # noqa: B006
                 has_end_token=True, end_token=None, tokenizer_args={}):  # noqa: B006  # fmt: skip
        self.tokenizer = fake_thirdparty.clip_tokenizer()
        self.embedding_key = embedding_key


class SD1Tokenizer:
    def __init__(self, embedding_directory=None, tokenizer_data={}, clip_name="l", tokenizer=SDTokenizer, name=None):  # noqa: B006
        self.clip_name = clip_name
        self.clip = f"clip_{clip_name}"
        setattr(self, self.clip, tokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data))


class SD1CheckpointClipModel(SDClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
        super().__init__(device=device, return_projected_pooled=False, dtype=dtype, model_options=model_options)


class SD1ClipModel(torch.nn.Module):
    def __init__(self, device="cpu", dtype=None, model_options={}, clip_name="l", clip_model=SD1CheckpointClipModel,  # noqa: B006
                 name=None, **kwargs):  # fmt: skip
        super().__init__()
        self.clip_name = clip_name
        self.clip = f"clip_{clip_name}"
        setattr(self, self.clip, clip_model(device=device, dtype=dtype, model_options=model_options, **kwargs))
        self.dtypes = {dtype} if dtype is not None else set()
