"""Fake of ldm_patched/modules/utils.py: the checkpoint-key conversions and attribute setters."""

import torch


def state_dict_prefix_replace(state_dict, replace_prefix, filter_keys=False):
    out = {} if filter_keys else state_dict
    for rp in replace_prefix:
        for x in [k for k in state_dict if k.startswith(rp)]:
            out[replace_prefix[rp] + x[len(rp) :]] = state_dict.pop(x) if not filter_keys else state_dict[x]
    return out


def transformers_convert(sd, prefix_from, prefix_to, number):
    keys_to_replace = {
        "{}positional_embedding": "{}embeddings.position_embedding.weight",
        "{}token_embedding.weight": "{}embeddings.token_embedding.weight",
        "{}ln_final.weight": "{}final_layer_norm.weight",
        "{}ln_final.bias": "{}final_layer_norm.bias",
    }
    for k in keys_to_replace:
        x = k.format(prefix_from)
        if x in sd:
            sd[keys_to_replace[k].format(prefix_to)] = sd.pop(x)
    resblock_to_replace = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
        "attn.out_proj": "self_attn.out_proj",
    }
    for resblock in range(number):
        for x in resblock_to_replace:
            for y in ["weight", "bias"]:
                k = f"{prefix_from}transformer.resblocks.{resblock}.{x}.{y}"
                if k in sd:
                    sd[f"{prefix_to}encoder.layers.{resblock}.{resblock_to_replace[x]}.{y}"] = sd.pop(k)
        for y in ["weight", "bias"]:
            k_from = f"{prefix_from}transformer.resblocks.{resblock}.attn.in_proj_{y}"
            if k_from in sd:
                weights = sd.pop(k_from)
                shape_from = weights.shape[0] // 3
                for x, p in enumerate(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]):
                    sd[f"{prefix_to}encoder.layers.{resblock}.{p}.{y}"] = weights[shape_from * x : shape_from * (x + 1)]
    return sd


def clip_text_transformers_convert(sd, prefix_from, prefix_to):
    sd = transformers_convert(sd, prefix_from, f"{prefix_to}text_model.", 32)
    tp = f"{prefix_from}text_projection.weight"
    if tp in sd:
        sd[f"{prefix_to}text_projection.weight"] = sd.pop(tp)
    tp = f"{prefix_from}text_projection"
    if tp in sd:
        sd[f"{prefix_to}text_projection.weight"] = sd.pop(tp).transpose(0, 1).contiguous()
    return sd


def get_attr(obj, attr):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr(obj, attr, value):
    attrs = attr.split(".")
    for name in attrs[:-1]:
        obj = getattr(obj, name)
    prev = getattr(obj, attrs[-1])
    setattr(obj, attrs[-1], value)
    return prev


def set_attr_param(obj, attr, value):
    return set_attr(obj, attr, torch.nn.Parameter(value, requires_grad=False))


def copy_to_param(obj, attr, value):
    get_attr(obj, attr).data.copy_(value)
