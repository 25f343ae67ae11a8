"""The Forge fakes keep Forge's names: every function/method the adapter and its tests rely on has the
same parameter names as in the real Forge source (read with ``ast``, never imported).

Set ``TE_SWITCH_FORGE_SRC`` to a Forge 2.x checkout to run them (skipped when unset; a path that is not a
Forge 2.x checkout fails, since it was asked for).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

FAKES = Path(__file__).parent / "fakes" / "forge"
SRC = os.environ.get("TE_SWITCH_FORGE_SRC", "")
REAL = Path(SRC)

# file -> qualified names that must exist in both with the same parameters
CHECKED: dict[str, list[str]] = {
    "backend/text_processing/classic_engine.py": [
        "CLIPEmbeddingForTextualInversion.__init__",
        "CLIPEmbeddingForTextualInversion.forward",
        "ClassicTextProcessingEngine.__init__",
        "ClassicTextProcessingEngine.empty_chunk",
        "ClassicTextProcessingEngine.get_target_prompt_token_count",
        "ClassicTextProcessingEngine.tokenize",
        "ClassicTextProcessingEngine.encode_with_transformers",
        "ClassicTextProcessingEngine.tokenize_line",
        "ClassicTextProcessingEngine.process_texts",
        "ClassicTextProcessingEngine.__call__",
        "ClassicTextProcessingEngine.process_tokens",
    ],
    "backend/text_processing/t5_engine.py": [
        "T5TextProcessingEngine.__init__",
        "T5TextProcessingEngine.tokenize",
        "T5TextProcessingEngine.encode_with_transformers",
        "T5TextProcessingEngine.tokenize_line",
        "T5TextProcessingEngine.__call__",
        "T5TextProcessingEngine.process_tokens",
    ],
    "backend/text_processing/parsing.py": ["parse_prompt_attention"],
    "backend/text_processing/emphasis.py": ["get_current_option", "EmphasisOriginal.after_transformers"],
    "backend/nn/clip.py": ["IntegratedCLIP.__init__"],
    "backend/nn/t5.py": [
        "T5LayerNorm.__init__",
        "T5DenseGatedActDense.__init__",
        "T5Attention.__init__",
        "T5Attention.compute_bias",
        "T5Attention.forward",
        "T5.__init__",
        "T5.forward",
        "IntegratedT5.__init__",
    ],
    "backend/nn/base.py": ["ModuleDict.__init__", "ObjectDict.__init__"],
    "backend/patcher/clip.py": ["CLIP.__init__", "CLIP.clone", "CLIP.add_patches"],
    "backend/patcher/base.py": [
        "ModelPatcher.__init__",
        "ModelPatcher.clone",
        "ModelPatcher.is_clone",
        "ModelPatcher.add_patches",
        "ModelPatcher.refresh_loras",
        "ModelPatcher.forge_patch_model",
        "ModelPatcher.forge_unpatch_model",
    ],
    "backend/patcher/lora.py": ["merge_lora_to_weight", "LoraLoader.__init__", "LoraLoader.refresh"],
    "backend/memory_management.py": [
        "LoadedModel.__init__",
        "LoadedModel.model_load",
        "LoadedModel.model_unload",
        "LoadedModel.__eq__",
        "load_models_gpu",
        "load_model_gpu",
        "unload_model_clones",
        "unload_all_models",
        "text_encoder_device",
        "text_encoder_offload_device",
        "text_encoder_dtype",
        "state_dict_dtype",
        "bake_gguf_model",
        "soft_empty_cache",
    ],
    "backend/operations.py": [
        "get_weight_and_bias",
        "ForgeOperations.Linear.__init__",
        "ForgeOperations.Linear._load_from_state_dict",
        "ForgeOperations.Linear.forward",
        "ForgeOperations.LayerNorm.forward",
        "ForgeOperations.Embedding.forward",
        "ForgeOperationsGGUF.Linear.__init__",
        "ForgeOperationsGGUF.Linear._load_from_state_dict",
        "ForgeOperationsGGUF.Linear._apply",
        "ForgeOperationsGGUF.Linear.forward",
        "using_forge_operations",
    ],
    "backend/operations_gguf.py": [
        "ParameterGGUF.__init__",
        "ParameterGGUF.__new__",
        "ParameterGGUF.dequantize_as_pytorch_parameter",
        "ParameterGGUF.copy_with_data",
        "ParameterGGUF.to",
        "dequantize_tensor",
    ],
    "backend/utils.py": ["set_attr_raw", "get_attr", "get_attr_with_parent", "tensor2parameter", "load_torch_file"],
    "backend/loader.py": ["load_huggingface_component", "forge_loader"],
    "backend/state_dict.py": ["load_state_dict", "try_filter_state_dict"],
    "backend/diffusion_engine/base.py": [
        "ForgeObjects.__init__",
        "ForgeObjects.shallow_copy",
        "ForgeDiffusionEngine.__init__",
        "ForgeDiffusionEngine.set_clip_skip",
        "ForgeDiffusionEngine.fix_for_webui_backward_compatibility",
    ],
    "backend/diffusion_engine/sd15.py": [
        "StableDiffusion.__init__",
        "StableDiffusion.set_clip_skip",
        "StableDiffusion.get_learned_conditioning",
        "StableDiffusion.get_prompt_lengths_on_ui",
    ],
    "backend/diffusion_engine/sd20.py": ["StableDiffusion2.set_clip_skip", "StableDiffusion2.get_learned_conditioning"],
    "backend/diffusion_engine/sdxl.py": [
        "StableDiffusionXL.set_clip_skip",
        "StableDiffusionXL.get_learned_conditioning",
        "StableDiffusionXLRefiner.set_clip_skip",
        "StableDiffusionXLRefiner.get_learned_conditioning",
    ],
    "backend/diffusion_engine/sd35.py": ["StableDiffusion3.set_clip_skip", "StableDiffusion3.get_learned_conditioning"],
    "backend/diffusion_engine/flux.py": ["Flux.set_clip_skip", "Flux.get_learned_conditioning"],
    "backend/diffusion_engine/chroma.py": ["Chroma.set_clip_skip", "Chroma.get_learned_conditioning"],
    "modules/processing.py": [
        "StableDiffusionProcessing.clear_prompt_cache",
        "StableDiffusionProcessing.cached_params",
        "StableDiffusionProcessing.get_conds_with_caching",
        "StableDiffusionProcessing.setup_conds",
        "manage_model_and_prompt_cache",
        "process_images",
    ],
    "modules/sd_models.py": [
        "FakeInitialModel.__init__",
        "SdModelData.__init__",
        "SdModelData.set_sd_model",
        "forge_model_reload",
        "select_checkpoint",
    ],
    "modules/sysinfo.py": ["set_config"],
    "modules_forge/main_entry.py": ["refresh_model_loading_parameters", "checkpoint_change", "modules_change"],
}
# class attributes the adapter reads or clears, per file
CLASS_LISTS = {
    "modules/processing.py": {
        "StableDiffusionProcessing": ("cached_c", "cached_uc"),
        "StableDiffusionProcessingTxt2Img": ("cached_hr_c", "cached_hr_uc"),
    }
}


def _defs(path: Path) -> dict[str, ast.AST]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: dict[str, ast.AST] = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                out[prefix + child.name] = child
                walk(child, prefix + child.name + ".")
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                out[prefix + child.name] = child

    walk(tree, "")
    return out


def _params(fn: ast.AST) -> list[str]:
    a = fn.args  # type: ignore[attr-defined]
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names += ["*" + a.vararg.arg] if a.vararg else []
    names += ["**" + a.kwarg.arg] if a.kwarg else []
    return names


def _class_attrs(cls: ast.AST) -> set[str]:
    names = set()
    for stmt in cls.body:  # type: ignore[attr-defined]
        targets = (
            stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        )
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


@pytest.mark.skipif(
    not SRC, reason="set TE_SWITCH_FORGE_SRC to a Forge 2.x checkout to compare the fakes with its source"
)
@pytest.mark.parametrize("rel", sorted(CHECKED))
def test_fake_signatures_match_forge(rel: str) -> None:
    assert (REAL / "backend" / "diffusion_engine").is_dir(), f"TE_SWITCH_FORGE_SRC={SRC} is not a Forge 2.x checkout"
    fake, real = _defs(FAKES / rel), _defs(REAL / rel)
    for name in CHECKED[rel]:
        assert name in real, f"{rel}: Forge has no {name} (update the fake list)"
        assert name in fake, f"{rel}: the fake lacks {name}"
        assert _params(fake[name]) == _params(real[name]), f"{rel}:{name}"
    for cls, attrs in CLASS_LISTS.get(rel, {}).items():
        for attr in attrs:
            assert attr in _class_attrs(real[cls]), f"{rel}: Forge's {cls} has no {attr}"
            assert attr in _class_attrs(fake[cls]), f"{rel}: the fake {cls} lacks {attr}"
