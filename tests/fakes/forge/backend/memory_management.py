"""Fake of backend/memory_management.py (CPU only): the model list, load/unload and dtype choices.

``current_loaded_models`` holds ``LoadedModel`` objects compared by patcher identity;
``load_model_gpu`` of an already loaded patcher only moves it to the front (no LoRA refresh), a
new one goes through ``model_load`` (patch, optional partial "CPU swap", GGUF bake, LoRA refresh).
``PARTIAL_LOAD`` makes ``model_load`` take the partial path so tests see its manual-cast flags.
"""

import torch

from backend.args import args

cpu = torch.device("cpu")
current_loaded_models = []
signal_empty_cache = False
PARTIAL_LOAD = False  # test switch: pretend the GPU is too small and stream some modules


def get_torch_device():
    return cpu


def text_encoder_device():
    return get_torch_device() if args.always_gpu else cpu


def text_encoder_offload_device():
    return get_torch_device() if args.always_gpu else cpu


def text_encoder_dtype(device=None):
    if args.clip_in_fp8_e4m3fn:
        return torch.float8_e4m3fn
    if args.clip_in_fp8_e5m2:
        return torch.float8_e5m2
    if args.clip_in_fp16:
        return torch.float16
    if args.clip_in_fp32:
        return torch.float32
    return torch.float16


def state_dict_dtype(state_dict):
    for k, v in state_dict.items():
        if hasattr(v, "gguf_cls"):
            return "gguf"
        if "bitsandbytes__nf4" in k:
            return "nf4"
        if "bitsandbytes__fp4" in k:
            return "fp4"
    counts = {}
    for tensor in state_dict.values():
        counts[tensor.dtype] = counts.get(tensor.dtype, 0) + 1
    return max(counts, key=counts.get) if counts else None


def bake_gguf_model(model):
    if getattr(model, "gguf_baked", False):
        return None
    for p in model.parameters():
        gguf_cls = getattr(p, "gguf_cls", None)
        if gguf_cls is not None:
            gguf_cls.bake(p)
    model.gguf_baked = True
    return model


def cast_to_device(tensor, device, dtype, copy=False):
    return tensor.to(device=device, dtype=dtype, copy=copy)


def soft_empty_cache(force=False):
    global signal_empty_cache
    signal_empty_cache = False


class LoadedModel:
    def __init__(self, model):
        self.model = model
        self.model_accelerated = False
        self.device = model.load_device

    def model_load(self, model_gpu_memory_when_using_cpu_swap=-1):
        do_not_need_cpu_swap = model_gpu_memory_when_using_cpu_swap < 0
        self.real_model = self.model.forge_patch_model(self.device if do_not_need_cpu_swap else None)
        self.model.current_device = self.model.load_device
        if not do_not_need_cpu_swap:
            # stream every manual-cast module from the offload device (the real code picks by budget)
            for m in self.real_model.modules():
                if hasattr(m, "parameters_manual_cast"):
                    m.prev_parameters_manual_cast = m.parameters_manual_cast
                    m.parameters_manual_cast = True
            self.model_accelerated = True
        bake_gguf_model(self.real_model)
        self.model.refresh_loras()
        return self.real_model

    def model_unload(self, avoid_model_moving=False):
        if self.model_accelerated:
            for m in self.real_model.modules():
                if hasattr(m, "prev_parameters_manual_cast"):
                    m.parameters_manual_cast = m.prev_parameters_manual_cast
                    del m.prev_parameters_manual_cast
            self.model_accelerated = False
        if avoid_model_moving:
            self.model.forge_unpatch_model()
        else:
            self.model.forge_unpatch_model(self.model.offload_device)

    def __eq__(self, other):
        return self.model is other.model


def unload_model_clones(model):
    to_unload = [i for i, lm in enumerate(current_loaded_models) if model.is_clone(lm.model)]
    for i in reversed(to_unload):
        current_loaded_models.pop(i).model_unload(avoid_model_moving=True)


def free_memory(memory_required, device, keep_loaded=(), free_all=False):
    if not free_all:
        return
    for i in range(len(current_loaded_models) - 1, -1, -1):
        if current_loaded_models[i] not in keep_loaded:
            current_loaded_models.pop(i).model_unload()
    soft_empty_cache()


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    to_load = []
    for x in models:
        loaded = LoadedModel(x)
        if loaded in current_loaded_models:
            index = current_loaded_models.index(loaded)
            current_loaded_models.insert(0, current_loaded_models.pop(index))
        else:
            to_load.append(loaded)
    for loaded in to_load:
        unload_model_clones(loaded.model)
        loaded.model_load(0 if PARTIAL_LOAD else -1)
        current_loaded_models.insert(0, loaded)


def load_model_gpu(model):
    return load_models_gpu([model])


def unload_all_models():
    free_memory(1e30, get_torch_device(), free_all=True)


def module_size(module, exclude_device=None, include_device=None, return_split=False):
    return sum(p.nelement() * p.element_size() for p in module.parameters())
