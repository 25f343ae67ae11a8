"""Fake of ldm_patched/modules/model_patcher.py (reForge's, ComfyUI 2025): patches are merged into the
weights when the patcher loads; the original Parameter is kept in ``backup`` and the merged weight is a
*new* Parameter (``set_attr_param``) unless ``weight_inplace_update``; ``unpatch_model`` puts the originals
back. Clones share the model and the backup dict. Patches are plain weight deltas ("diff" LoRA)."""

import uuid

import torch

import ldm_patched.modules.utils


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.size = size
        self.model = model
        self.patches = {}
        self.backup = {}
        self.object_patches = {}
        self.object_patches_backup = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        self.weight_inplace_update = weight_inplace_update
        self.patches_uuid = uuid.uuid4()
        self.parent = None
        if not hasattr(self.model, "current_weight_patches_uuid"):
            self.model.current_weight_patches_uuid = None
        if not hasattr(self.model, "model_loaded_weight_memory"):
            self.model.model_loaded_weight_memory = 0

    def model_size(self):
        return sum(t.nelement() * t.element_size() for t in self.model.state_dict().values())

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size,
                           weight_inplace_update=self.weight_inplace_update)  # fmt: skip
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.backup = self.backup
        n.parent = self
        return n

    def is_clone(self, other):
        return hasattr(other, "model") and self.model is other.model

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        keys = set(self.model.state_dict().keys())
        p = set()
        for k in patches:
            if k in keys:
                p.add(k)
                self.patches.setdefault(k, []).append((strength_patch, patches[k], strength_model))
        self.patches_uuid = uuid.uuid4()
        return list(p)

    def model_dtype(self):
        return None

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if key not in self.patches:
            return
        weight = ldm_patched.modules.utils.get_attr(self.model, key)
        inplace_update = self.weight_inplace_update or inplace_update
        if key not in self.backup:
            self.backup[key] = weight.to(device=self.offload_device, copy=inplace_update)
        out = weight.to(torch.float32, copy=True)
        for strength, delta, strength_model in self.patches[key]:
            out = out * strength_model + strength * delta.to(out)
        out = out.to(weight.dtype)
        if inplace_update:
            ldm_patched.modules.utils.copy_to_param(self.model, key, out)
        else:
            ldm_patched.modules.utils.set_attr_param(self.model, key, out)

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        if load_weights and self.model.current_weight_patches_uuid != self.patches_uuid:
            if self.model.current_weight_patches_uuid is not None:
                self.unpatch_model()
            for key in self.patches:
                self.patch_weight_to_device(key, device_to=device_to)
            self.model.current_weight_patches_uuid = self.patches_uuid
            self.model.model_loaded_weight_memory = self.model_size()
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for k in list(self.backup.keys()):
                if self.weight_inplace_update:
                    ldm_patched.modules.utils.copy_to_param(self.model, k, self.backup[k])
                else:
                    ldm_patched.modules.utils.set_attr(self.model, k, self.backup[k])
            self.backup.clear()
            self.model.current_weight_patches_uuid = None
            self.model.model_loaded_weight_memory = 0

    def detach(self, unpatch_all=True):
        if unpatch_all:
            self.unpatch_model(self.offload_device, unpatch_weights=unpatch_all)
        return self.model
