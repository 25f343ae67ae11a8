"""Flux on Forge 2's REAL text path, no server, no downloads: issue 8's Long-CLIP and fp32 claims.

Run by ``tests/test_forge_real.py`` (skipped unless ``TE_SWITCH_FORGE_SRC`` is set), or directly with
Forge's venv (a few minutes, ~3.3 GB peak RSS)::

    TE_SWITCH_FORGE_SRC=/path/to/forge /path/to/forge/venv/bin/python tests/forge_real_check.py

Forge's own code builds and encodes: ``backend.loader.forge_loader`` (``split_state_dict``, its menu's
``replace_state_dict``, ``load_huggingface_component`` building ``IntegratedCLIP`` / ``IntegratedT5``
in Forge's operations), the real ``Flux`` engine with its ``ClassicTextProcessingEngine`` /
``T5TextProcessingEngine`` and ``Flux.get_learned_conditioning``, Forge's memory manager and its bundled
tokenizers and configs (``backend/huggingface``). Left out is only what the claims do not touch: the
diffusion transformer and the VAE (a stand-in each, nothing built), and the WebUI layer around the
backend (``modules.*``: options, ``model_data``, ``forge_model_reload``), which is the fake tree whose
signatures ``test_forge_fakes.py`` checks against the same checkout. CLIP-L has its real shape (12 x 768;
Long-CLIP 248 positions); T5 is cut to 512 wide and 2 blocks in a copy of Forge's bundled config (the
claims do not depend on its size; real width does not fit this check's memory), with the real
vocabulary and tokenizer.

What it shows, with a 200-token prompt:

* fp32 on both slots (a Long-CLIP-GmP file in CLIP-L; a T5 file: fp16, fp32, GGUF Q8_0) equals an fp32
  reference encode of the same file's values within 1e-5 relative (max |diff| / max |reference|):
  transformers ``CLIPTextModel`` with 248 positions and ``T5EncoderModel``, loaded straight from the file
  (GGUF values as gguf-py dequantises them). Flux's ``vector`` is CLIP-L's ``pooler_output`` (the first
  EOS token's final-layer-norm state; not projected, though the file has a ``text_projection``) and
  ``crossattn`` is T5's last hidden state;
* precision Auto equals stock Forge loading the same file through its own menu, bit for bit (T5; the
  Long-CLIP file, which stock Forge's 77-position CLIP-L config refuses, with a 248-position config);
* Built-in gives back every tensor and the stock conditioning bit for bit, from the checkpoint file
  (no RAM copy).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PASSED = "ALL REAL-FORGE FLUX CHECKS PASSED"

T5_CUT = {"d_model": 512, "d_kv": 64, "d_ff": 1024, "num_heads": 8, "num_layers": 2}
REPO = "black-forest-labs/FLUX.1-dev"
PROMPT_WORDS = ["fox", "snow", "tree", "light"] * 50  # one CLIP token each: 200 tokens


def main(scratch: Path) -> None:  # pragma: no cover - runs in the subprocess
    """Builds its files under ``scratch`` (about 1 GB)."""
    import contextlib
    import json
    import shutil
    import types
    from dataclasses import replace
    from types import SimpleNamespace

    src = Path(os.environ["TE_SWITCH_FORGE_SRC"]).resolve()
    assert (src / "backend" / "diffusion_engine" / "flux.py").is_file(), f"{src} is not a Forge 2.x checkout"
    fakes = ROOT / "tests" / "fakes"
    sys.argv = [sys.argv[0], "--always-cpu"]  # Forge's backend.args: what the rig starts it with
    sys.path[:0] = [
        str(ROOT),
        str(ROOT / "tests"),
        str(fakes / "forge"),  # modules.*, modules_forge.* (the WebUI layer) ...
        str(fakes / "common"),
        str(src / "repositories" / "huggingface_guess"),
        str(src / "packages_3rdparty"),  # Forge's own gguf
    ]
    for name in ("backend", "packages_3rdparty"):  # ... and Forge's real backend, never the fake one
        package = types.ModuleType(name)
        package.__path__ = [str(src / name)]
        sys.modules[name] = package

    import refmodels as rm
    import synth_gguf
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.set_num_threads(min(2, torch.get_num_threads()))
    from backend import loader, memory_management
    from backend.diffusion_engine import flux as forge_flux
    from modules import processing, sd_models, shared
    from modules_forge import main_entry

    from te_switch.core.detect import detect
    from te_switch.core.readers import open_file
    from te_switch.core.selection import Selection, SlotChoice
    from te_switch.hosts.engine import EncoderSource, SwapEngine
    from te_switch.hosts.forge import ForgeAdapter

    assert memory_management.text_encoder_dtype() == torch.float16  # Forge on CPU: fp16 storage, fp32 compute

    # -- Forge's bundled Flux repo (configs, tokenizers), T5 cut; a second copy with a 248-position CLIP-L
    def repo(name: str, clip_positions: int) -> Path:
        root = scratch / name
        local = root / "huggingface" / REPO
        shutil.copytree(src / "backend" / "huggingface" / REPO, local)
        t5_config = json.loads((local / "text_encoder_2" / "config.json").read_text())
        (local / "text_encoder_2" / "config.json").write_text(json.dumps({**t5_config, **T5_CUT}))
        clip_config = json.loads((local / "text_encoder" / "config.json").read_text())
        clip_config["max_position_embeddings"] = clip_positions
        (local / "text_encoder" / "config.json").write_text(json.dumps(clip_config))
        return root

    stock_repo, long_repo = repo("forge-repo", 77), repo("forge-repo-248", 248)
    local = stock_repo / "huggingface" / REPO
    clip_cfg = json.loads((local / "text_encoder" / "config.json").read_text())
    t5_cfg = json.loads((local / "text_encoder_2" / "config.json").read_text())

    # the diffusion transformer and the VAE are not part of the text path: stand-ins, nothing built
    real_component = loader.load_huggingface_component

    def component(guess, component_name, lib_name, cls_name, repo_path, state_dict):
        if component_name in ("transformer", "vae"):
            return SimpleNamespace(name=component_name)
        return real_component(guess, component_name, lib_name, cls_name, repo_path, state_dict)

    loader.load_huggingface_component = component
    forge_flux.VAE = lambda model: model
    forge_flux.UnetPatcher = SimpleNamespace(from_model=lambda model, **kw: model)

    # -- files: random weights, real CLIP-L shape
    def clip_model(positions: int, seed: int | None) -> torch.nn.Module:
        cfg = {k: v for k, v in clip_cfg.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype")}
        model = CLIPTextModel(CLIPTextConfig(**{**cfg, "max_position_embeddings": positions})).eval()
        if seed is not None:
            with torch.no_grad():
                rm.randomize_(model, seed)
        return model

    def t5_weights(seed: int) -> dict[str, torch.Tensor]:
        d = T5_CUT
        model = rm.make_t5(
            d["d_model"], d["d_ff"], d["num_layers"], d["num_heads"], vocab=t5_cfg["vocab_size"], seed=seed
        )
        return {k: v * 8 if k == "shared.weight" else v for k, v in rm.t5_canonical_sd(model).items()}

    dit = {f"model.diffusion_model.{k}": torch.zeros(4) for k in ("a", "b", "c", "d", "e")}
    dit["model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale"] = torch.zeros(128)
    dit["model.diffusion_model.guidance_in.in_layer.weight"] = torch.zeros(4)  # Flux dev
    # the checkpoint (Forge's single-file Flux layout), its text encoders in fp16
    state = dict(dit)
    state.update(
        {
            f"text_encoders.clip_l.transformer.{k}": v.half()
            for k, v in rm.hf_clip_canonical_sd(clip_model(77, 11)).items()
        }
    )
    state.update({f"text_encoders.t5xxl.transformer.{k}": v.half() for k, v in t5_weights(12).items()})
    ckpt = scratch / "flux-real-text.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt))
    del state
    # Long-CLIP-GmP (zer0int's TE-only HF layout: 248 positions, with text_projection), fp32 as released
    long_sd = rm.hf_clip_canonical_sd(clip_model(248, 21))
    long_sd["text_projection.weight"] = torch.randn(768, 768, generator=torch.Generator().manual_seed(22)) * 0.05
    long_path = scratch / "Long-ViT-L-14-GmP-TE-only.safetensors"
    save_file(long_sd, str(long_path))
    del long_sd
    # T5 files of one master: fp16, fp32 (values fp16 cannot hold), GGUF Q8_0 (token_embd quantised too)
    t5_master = t5_weights(31)
    t5_files = {"t5-fp16": scratch / "t5xxl-cut-fp16.safetensors", "t5-fp32": scratch / "t5xxl-cut-fp32.safetensors"}
    save_file({k: v.half().contiguous() for k, v in t5_master.items()}, str(t5_files["t5-fp16"]))
    save_file({k: v.contiguous() for k, v in t5_master.items()}, str(t5_files["t5-fp32"]))
    t5_files["t5-q8"] = scratch / "t5xxl-cut-Q8_0.gguf"
    names = synth_gguf.hf_t5_to_llama_names(t5_master)
    q8_held = synth_gguf.write_gguf(
        t5_files["t5-q8"], names, {n: "Q8_0" for n, v in names.items() if v.dim() == 2 and "rel_b" not in n}
    )
    from_llama = synth_gguf.hf_t5_to_llama_names({k: k for k in t5_master})  # llama.cpp name -> HF name
    t5_values = {
        "t5-fp16": load_file(str(t5_files["t5-fp16"])),
        "t5-fp32": load_file(str(t5_files["t5-fp32"])),
        "t5-q8": {from_llama[n]: v.float() for n, v in q8_held.items()},  # as gguf-py dequantises them, fp32
    }

    def source(path: Path, label: str, kind: str | None = None) -> EncoderSource:
        with open_file(str(path)) as f:
            tower = detect(f)[0]
        return EncoderSource(str(path), replace(tower, kind=kind) if kind else tower, label)

    table = {"long": source(long_path, "long")}
    table.update({label: source(path, label, "t5-xxl") for label, path in t5_files.items()})  # width cut
    assert table["long"].tower.kind == "long-clip-l", table["long"].tower

    # -- independent fp32 references: transformers, straight from the files' values
    def clip_reference(path: Path) -> torch.nn.Module:
        model = clip_model(248, None)
        sd = {k: v for k, v in load_file(str(path)).items() if k.startswith("text_model.")}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        assert missing == ["text_model.embeddings.position_ids"] or not missing, missing
        assert not unexpected, unexpected
        return model

    def t5_reference(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
        cfg = {k: v for k, v in t5_cfg.items() if not k.startswith("_")}
        model = T5EncoderModel(T5Config(**{**cfg, "dropout_rate": 0.0, "tie_word_embeddings": False})).eval()
        rm.load_canonical_into_hf(model, {k: v.float() for k, v in sd.items()})
        return model

    prompt = " ".join(PROMPT_WORDS)

    def clip_ids(tokenizer: object) -> torch.Tensor:
        words = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert len(words) == len(PROMPT_WORDS) == 200
        ids = [tokenizer.bos_token_id, *words, tokenizer.eos_token_id]
        return torch.tensor([ids + [tokenizer.pad_token_id] * (248 - len(ids))])

    def t5_ids(tokenizer: object) -> torch.Tensor:
        ids = [*tokenizer(prompt, add_special_tokens=False)["input_ids"], 1]
        return torch.tensor([ids + [0] * (256 - len(ids))])

    # -- Forge, loading as the WebUI does (fake modules.* around the real backend)
    def load(modules: tuple[Path, ...] = (), repo_root: Path = stock_repo) -> object:
        loader.dir_path = str(repo_root)  # where forge_loader finds its bundled repo
        info = sd_models.register_checkpoint(str(ckpt))
        shared.opts.set("sd_model_checkpoint", info.title)
        shared.opts.set("forge_additional_modules", [str(m) for m in modules])  # the VAE / Text Encoder menu
        main_entry.refresh_model_loading_parameters()
        sd_models.model_data.forge_loading_parameters["repo"] = str(repo_root)  # another repo: another model
        model, _ = sd_models.forge_model_reload()
        processing.need_global_unload = False
        assert type(model) is forge_flux.Flux, type(model)
        return model

    notes: list[str] = []  # the engine's console line when it must keep a RAM copy to restore Built-in
    adapter = ForgeAdapter(SwapEngine(notify=notes.append))
    adapter.resolver = lambda slot, label: table[label]

    def encode(model: object, selection: Selection | None) -> dict[str, torch.Tensor]:
        if selection is not None:
            adapter.begin(selection)
        try:
            model.set_clip_skip(1)
            with contextlib.redirect_stdout(None):  # "Distilled CFG Scale: 3.5"
                cond = model.get_learned_conditioning([prompt])
            return {k: cond[k] for k in ("crossattn", "vector")}
        finally:
            adapter.end()

    def tensors(model: object) -> dict[str, torch.Tensor]:
        joint = model.forge_objects.clip.cond_stage_model
        out = {k: v.detach().clone() for k, v in joint.state_dict(keep_vars=True).items()}
        out.update({"buffer:" + k: v.detach().clone() for k, v in joint.named_buffers()})
        return out

    def same_tensors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], what: str) -> None:
        assert before.keys() == after.keys(), what
        for k in before:
            assert before[k].dtype == after[k].dtype, f"{what}: {k}"
            assert torch.equal(before[k], after[k]), f"{what}: {k}"

    def same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        assert a.dtype == b.dtype == torch.float32, (what, a.dtype, b.dtype)
        assert torch.equal(a, b), f"{what}: differs by {(a - b).abs().max().item():.3g}"

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        """max |a - b| / max |b|"""
        assert a.shape == b.shape, (a.shape, b.shape)
        return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()

    model = load()
    engine_l = model.text_processing_engine_l
    stock = encode(model, None)
    before = tensors(model)
    adapter.install()
    for k in stock:
        same(encode(model, Selection())[k], stock[k], f"Auto with Built-in slots, {k}")

    ids = clip_ids(engine_l.tokenizer)
    eos = 1 + len(PROMPT_WORDS)
    assert int(ids[0].argmax()) == eos  # the first EOS (HF pools argmax(ids)); the padding repeats it
    assert ids[0, eos] == engine_l.id_end == engine_l.id_pad
    with torch.no_grad():
        out = clip_reference(long_path)(ids, output_hidden_states=True)
        pooled_ref = out.pooler_output  # Flux's vector: CLIP-L's pooled output, no projection
        assert torch.equal(pooled_ref, out.last_hidden_state[:, eos])  # = the first EOS's final-layer-norm state
        del out
        t5_tokens = t5_ids(model.text_processing_engine_t5.tokenizer)
        t5_refs = {label: t5_reference(sd)(input_ids=t5_tokens).last_hidden_state for label, sd in t5_values.items()}

    results: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for t5_label in t5_files:
        for precision in ("fp32", "auto"):
            choice = Selection(
                None, "both", {"clip_l": SlotChoice("long", precision), "t5xxl": SlotChoice(t5_label, precision)}
            )
            assert sorted(adapter.apply(choice)) == ["clip_l", "t5xxl"]
            assert engine_l.chunk_length == 246
            chunks, _ = engine_l.tokenize_line(prompt)
            assert [c.tokens for c in chunks] == ids.tolist()  # one 248-token chunk, the reference's ids
            cond = results[t5_label, precision] = encode(model, choice)
            print(
                f"{precision:>4} Long-CLIP + {t5_label} vs fp32 reference: vector rel {rel(cond['vector'], pooled_ref):.3g},"
                f" crossattn rel {rel(cond['crossattn'], t5_refs[t5_label]):.3g}"
            )
            if precision == "fp32":
                assert rel(cond["vector"], pooled_ref) <= 1e-5
                assert rel(cond["crossattn"], t5_refs[t5_label]) <= 1e-5
            adapter.apply(Selection())
            assert engine_l.chunk_length == 75
            same_tensors(before, tensors(model), f"Built-in after {t5_label} {precision}")
            for k, restored in encode(model, Selection()).items():
                same(restored, stock[k], f"Built-in after {t5_label} {precision}, {k}")
    adapter.uninstall()
    assert not notes, notes
    del model, before

    # stock Forge loading the same files through its own menu (forge_additional_modules): each T5 ...
    for t5_label, path in t5_files.items():
        menu = encode(load((path,)), None)
        print(
            f"stock Forge, {t5_label} from its menu vs fp32 reference: crossattn rel {rel(menu['crossattn'], t5_refs[t5_label]):.3g}"
        )
        same(menu["vector"], stock["vector"], f"{t5_label} menu: CLIP-L untouched")
        same(results[t5_label, "auto"]["crossattn"], menu["crossattn"], f"{t5_label} at Auto vs Forge's menu")
    # ... and the Long-CLIP file: Forge's 77-position CLIP-L config cannot take it; with a 248-position one
    # its loader builds it as for any CLIP-L file
    try:
        load((long_path,))
        print("stock Forge, Long-CLIP from its menu: loaded")
    except Exception as e:  # what users of stock Forge get
        print(f"stock Forge, Long-CLIP from its menu: {type(e).__name__}: {' '.join(str(e).split())[:220]}")
    forge_long = load((long_path,), repo_root=long_repo)
    forge_long.text_processing_engine_l.chunk_length = 246
    native_long = encode(forge_long, None)
    print(
        f"Forge's loader with a 248-position config, Long-CLIP vs fp32 reference: vector rel {rel(native_long['vector'], pooled_ref):.3g}"
    )
    for (t5_label, precision), cond in results.items():
        if precision == "auto":
            same(cond["vector"], native_long["vector"], f"Long-CLIP at Auto (with {t5_label}) vs Forge's loader")
    print(PASSED)


if __name__ == "__main__":  # pragma: no cover
    if os.environ.get("TE_SWITCH_SCRATCH"):
        main(Path(os.environ["TE_SWITCH_SCRATCH"]))
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="te-switch-forge-real-") as tmp:
            main(Path(tmp))
