"""Fake of Forge Classic's ldm_patched/modules/model_management.py (Forge 1 era): as the shared fake but
``LoadedModel(model, memory_required)`` holds the patcher directly and ``model_unload(avoid_model_moving)``."""

import torch

current_loaded_models = []


class LoadedModel:
    def __init__(self, model, memory_required):
        self.model = model
        self.memory_required = memory_required
        self.model_accelerated = False
        self.device = model.load_device

    def model_load(self, async_kept_memory=-1):
        self.real_model = self.model.patch_model(device_to=self.device)
        return self.real_model

    def model_unload(self, avoid_model_moving=False):
        self.model.unpatch_model(None if avoid_model_moving else self.model.offload_device)

    def __eq__(self, other):
        return self.model is other.model


def load_models_gpu(models, memory_required=0):
    for x in set(models):
        loaded = LoadedModel(x, memory_required=memory_required)
        if loaded in current_loaded_models:
            current_loaded_models[current_loaded_models.index(loaded)].model.patch_model()
            continue
        for i in reversed(range(len(current_loaded_models))):
            if x.is_clone(current_loaded_models[i].model):
                current_loaded_models.pop(i).model_unload(avoid_model_moving=True)
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
