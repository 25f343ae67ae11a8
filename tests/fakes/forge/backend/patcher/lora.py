"""Fake of backend/patcher/lora.py: ``LoraLoader.refresh`` with Forge's backup/restore bookkeeping.

``refresh`` first puts every backed-up original Parameter object back, then merges the given patches
(in fp32) into *new* Parameters, keeping the originals in ``backup`` (moved to the offload device).
``loaded_hash`` skips work when the patch set did not change. Patch values: ``(tensor,)`` ("diff")
or ``("lora", (up, down, alpha, mid, dora_scale))``.
"""

import torch

from backend import memory_management, utils

CPU = torch.device("cpu")


@torch.inference_mode()
def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    dtype_backup = None
    if computation_dtype == weight.dtype:
        weight = weight.clone()
    else:
        dtype_backup = weight.dtype
        weight = weight.to(dtype=computation_dtype)
    for strength, v, strength_model, _offset, _function in patches:
        if strength_model != 1.0:
            weight *= strength_model
        if len(v) == 1:
            weight += strength * v[0].to(device=weight.device, dtype=weight.dtype)
        elif v[0] == "lora":
            up, down, alpha = v[1][0], v[1][1], v[1][2]
            scale = 1.0 if alpha is None else alpha / down.shape[0]
            diff = torch.mm(
                up.to(computation_dtype).flatten(start_dim=1), down.to(computation_dtype).flatten(start_dim=1)
            )
            weight += ((strength * scale) * diff.reshape(weight.shape)).type(weight.dtype)
        else:
            raise ValueError(f"patch type not recognized {v[0]} {key}")
    if dtype_backup is not None:
        weight = weight.to(dtype=dtype_backup)
    return weight


def get_parameter_devices(model):
    return {key: p.device for key, p in model.named_parameters()}


def set_parameter_devices(model, parameter_devices):
    for key, device in parameter_devices.items():
        p = utils.get_attr(model, key)
        if p.device != device:
            utils.set_attr_raw(model, key, utils.tensor2parameter(p.to(device=device)))
    return model


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.online_backup = []
        self.loaded_hash = str([])

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=CPU, force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        all_patches = {}
        for (_, _, _, online_mode), patches in lora_patches.items():
            for key, current in patches.items():
                all_patches[(key, online_mode)] = all_patches.get((key, online_mode), []) + current
        memory_management.signal_empty_cache = True
        parameter_devices = get_parameter_devices(self.model)

        # restore the original Parameter objects
        for k, w in self.backup.items():
            if not isinstance(w, torch.nn.Parameter):
                w = torch.nn.Parameter(w, requires_grad=False)
            utils.set_attr_raw(self.model, k, w)
        self.backup = {}
        set_parameter_devices(self.model, parameter_devices=parameter_devices)

        for (key, _online_mode), current in all_patches.items():
            try:
                _parent, _child, weight = utils.get_attr_with_parent(self.model, key)
                assert isinstance(weight, torch.nn.Parameter)
            except Exception:
                raise ValueError(f"Wrong LoRA Key: {key}") from None
            if key not in self.backup:
                self.backup[key] = weight.to(device=offload_device)
            merged = merge_lora_to_weight(current, weight, key, computation_dtype=torch.float32)
            utils.set_attr_raw(self.model, key, torch.nn.Parameter(merged, requires_grad=False))

        set_parameter_devices(self.model, parameter_devices=parameter_devices)
        self.loaded_hash = hashes
