"""Fake of ldm_patched/modules/model_management.py (reForge's): the loaded-model list and the CPU choices
the text encoder gets (fp16 weights even on the CPU, like the real ``text_encoder_dtype``)."""

import weakref

import torch

current_loaded_models = []


class LoadedModel:
    def __init__(self, model):
        self._model = weakref.ref(model)
        self.device = model.load_device
        self.real_model = None
        self.currently_used = True

    @property
    def model(self):
        return self._model()

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        self.real_model = weakref.ref(self.model.patch_model(device_to=self.device))
        return self.real_model()

    def model_unload(self, memory_to_free=None, unpatch_weights=True):
        self.model.detach(unpatch_weights)
        self.real_model = None
        return True

    def __eq__(self, other):
        return self.model is other.model


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):  # fmt: skip
    for x in set(models):
        loaded = LoadedModel(x)
        if loaded in current_loaded_models:
            current_loaded_models[current_loaded_models.index(loaded)].model.patch_model()
            continue
        for i in reversed(range(len(current_loaded_models))):
            if x.is_clone(current_loaded_models[i].model):
                current_loaded_models.pop(i).model.detach(unpatch_all=False)
        loaded.model_load()
        current_loaded_models.insert(0, loaded)


def load_model_gpu(model):
    return load_models_gpu([model])


def text_encoder_device():
    return torch.device("cpu")


def text_encoder_offload_device():
    return torch.device("cpu")


def text_encoder_dtype(device=None):
    return torch.float16


def intermediate_device():
    return torch.device("cpu")


def soft_empty_cache(force=False):
    pass


def unload_all_models():
    while current_loaded_models:
        current_loaded_models.pop().model_unload()
