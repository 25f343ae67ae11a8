"""The Forge 2.x adapter against faithful fakes of Forge's backend (tests/fakes/forge).

Every model here is built the way Forge builds it (fp16 storage, manual-cast Forge layers, TI wrapper,
JointTextEncoder + patcher + LoRA loader) from small checkpoint files with real layer counts
(CLIP-L 12, CLIP-G 32, Forge's SD2 CLIP-H 23) and small widths. Encoder files use small widths too,
so their detected kind is set by hand (``source``): detection by width is tested elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import refmodels as rm
import torch
from fakes.forge.assets import CONFIGS, G_DIMS, H_DIMS, L_DIMS, T5_DIMS, T5_VOCAB, Assets, build_assets
from fakes.harness import fake_webui

from te_switch.core.detect import detect
from te_switch.core.readers import open_file
from te_switch.core.selection import Selection, SlotChoice
from te_switch.hosts.engine import EncoderSource, SwapEngine

PROMPT = "a red fox sitting in the snow, (detailed fur:1.2), soft light"
NEG = "blurry, lowres"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    return build_assets(tmp_path_factory.mktemp("forge_assets"))


def source(path: Path, kind: str, label: str) -> EncoderSource:
    """An encoder file as the library would resolve it (kind set by hand: the widths are small)."""
    with open_file(str(path)) as src:
        info = detect(src)[0]
    return EncoderSource(str(path), replace(info, kind=kind), label, "abc123")


def make_resolver(a: Assets, extra: dict[str, EncoderSource] | None = None):
    table = {
        "gmp-l": source(a.files["l_file"], "clip-l", "gmp-l"),
        "long-l": source(a.files["long_file"], "long-clip-l", "long-l"),
        "big-g": source(a.files["g_file"], "clip-g", "big-g"),
        "h24": source(a.files["h_file"], "clip-h", "h24"),
        "t5-fp16": source(a.files["t5_file"], "t5-xxl", "t5-fp16"),
        "t5-fp8s": source(a.files["t5_fp8s_file"], "t5-xxl", "t5-fp8s"),
        "t5-q8": source(a.files["t5_q8_file"], "t5-xxl", "t5-q8"),
        "l32": source(a.files["l32_file"], "clip-l", "l32"),
        "truncated": source(a.files["truncated"], "clip-l", "truncated"),
        "nan": source(a.files["nan"], "clip-l", "nan"),
        **(extra or {}),
    }

    def resolve(slot: str, label: str) -> EncoderSource:
        from te_switch.core.errors import TESwitchError

        if label not in table:
            raise TESwitchError(f"{label}: not found")
        return table[label]

    return resolve


@dataclass
class Env:
    model: Any
    adapter: Any
    assets: Assets

    def conds(self, prompts: list[str] | None = None, negative: bool = False) -> Any:
        from modules.prompt_parser import SdConditioning

        cond = SdConditioning(prompts or [PROMPT], width=1024, height=1024, is_negative_prompt=negative)
        return self.model.get_learned_conditioning(cond)

    def encode(self, selection: Selection | None, prompts: list[str] | None = None, host_clip_skip: int = 1) -> Any:
        """One encode the way Forge's processing does it: set_clip_skip(opts), then the engines."""
        if selection is not None:
            self.adapter.begin(selection)
        try:
            self.model.set_clip_skip(host_clip_skip)
            return self.conds(prompts)
        finally:
            self.adapter.end()

    def apply(self, selection: Selection) -> list[str]:
        return self.adapter.apply(selection)


@contextmanager
def forge(
    a: Assets,
    family: str,
    *,
    install: bool = True,
    extra: dict | None = None,
    checkpoint: Path | None = None,
    modules: list[Path] | None = None,
) -> Iterator[Env]:
    """A fake Forge with ``family``'s checkpoint loaded (like after the first Generate)."""
    with fake_webui("forge"):
        from modules import processing, sd_models, shared
        from modules_forge import main_entry

        from te_switch.hosts.forge import ForgeAdapter

        info = sd_models.register_checkpoint(str(checkpoint or a.checkpoints[family]))
        shared.opts.set("sd_model_checkpoint", info.title)
        shared.opts.set("forge_additional_modules", [str(m) for m in modules or ()])  # the VAE / Text Encoder menu
        main_entry.refresh_model_loading_parameters()
        model, _ = sd_models.forge_model_reload()
        processing.need_global_unload = False  # as the first generation's manage_model_and_prompt_cache leaves it
        adapter = ForgeAdapter(SwapEngine())
        adapter.resolver = make_resolver(a, extra)
        if install:
            adapter.install()
        try:
            yield Env(model, adapter, a)
        finally:
            adapter.uninstall()


def sel(clip_skip: int | None = None, scope: str = "both", **slots: str | SlotChoice) -> Selection:
    choices = {k: v if isinstance(v, SlotChoice) else SlotChoice(v) for k, v in slots.items()}
    return Selection(clip_skip, scope, choices)


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones such as ``position_ids`` too), copied."""
    out = {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}
    out.update({"buffer:" + k: v.detach().clone() for k, v in module.named_buffers()})
    return out


def assert_same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype, k
        assert torch.equal(before[k], after[k]), k


# ---------------------------------------------------------------------------------------------
# independent references: transformers modules loaded straight from the canonical weights


def hf_clip(key: str, weights: dict[str, torch.Tensor], *, projection: bool = False, positions: int = 77) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = {k: v for k, v in CONFIGS[key].items() if k not in ("architectures", "model_type", "torch_dtype")}
    cfg.update(
        max_position_embeddings=positions, num_hidden_layers=H_DIMS[1] if key == "h" else cfg["num_hidden_layers"]
    )
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**cfg)).eval()
    rm.load_canonical_into_hf(model, {k: v for k, v in weights.items() if projection or not k.startswith("text_proj")})
    if not hasattr(model, "text_model"):
        model.__dict__["text_model"] = (
            model  # diffusers' SD encode_prompt reads .text_model (transformers >= 5.6 has none)
        )
    return model


def hf_t5(weights: dict[str, torch.Tensor]) -> Any:
    from transformers import T5Config, T5EncoderModel

    d = T5_DIMS
    cfg = T5Config(
        vocab_size=T5_VOCAB,
        d_model=d["d_model"],
        d_kv=d["d_model"] // d["num_heads"],
        d_ff=d["d_ff"],
        num_layers=d["num_layers"],
        num_heads=d["num_heads"],
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
    )
    model = T5EncoderModel(cfg).eval()
    rm.load_canonical_into_hf(model, weights)
    return model


def clip_ids(env: Env, tower: str, prompt: str) -> torch.Tensor:
    """The token ids Forge's engine feeds the tower for a one-chunk prompt."""
    engine = env.adapter._engine_for(env.model, tower)
    chunks, _ = engine.tokenize_line(prompt)
    ids = list(chunks[0].tokens)
    if engine.id_end != engine.id_pad:
        end = ids.index(engine.id_end)
        ids[end + 1 :] = [engine.id_pad] * (len(ids) - end - 1)
    return torch.tensor([ids])


@torch.no_grad()
def hidden(model: Any, ids: torch.Tensor, skip: int, *, ln: bool) -> torch.Tensor:
    out = model(ids, output_hidden_states=True)
    z = out.hidden_states[-skip]
    return model.text_model.final_layer_norm(z) if ln else z


def one_line(e: BaseException) -> str:
    text = str(e)
    assert text, type(e)
    assert "\n" not in text, text
    return text


def slot_module(env: Env, name: str) -> torch.nn.Module:
    return getattr(env.model.forge_objects.clip.cond_stage_model, name).transformer


PLAIN = "a red fox sitting in the snow"


# ---------------------------------------------------------------------------------------------
# identity: what the adapter finds in a live Forge model


def test_live_model_family_and_slots(assets: Assets) -> None:
    with fake_webui("forge"):
        from te_switch.hosts.forge import ForgeAdapter

        adapter = ForgeAdapter(SwapEngine())
        assert adapter.live_model() is None  # FakeInitialModel before the first generation
        assert adapter.describe(Selection()).startswith("No model loaded yet")
    expected = {
        "sd15": ("sd1", ["clip_l"]),
        "sd20": ("sd2", ["clip_h"]),
        "sdxl": ("sdxl", ["clip_l", "clip_g"]),
        "sdxl-refiner": ("sdxl-refiner", ["clip_g"]),
        "sd35": ("sd3", ["clip_l", "clip_g", "t5xxl"]),
        "flux": ("flux", ["clip_l", "t5xxl"]),
        "chroma": ("chroma", ["t5xxl"]),
    }
    for engine, (family, slots) in expected.items():
        with forge(assets, engine, install=False) as env:
            assert env.adapter.live_model() is env.model
            assert env.adapter.family(env.model) == family
            live = env.adapter.slots(env.model)
            assert list(live) == slots
            for name, slot in live.items():
                assert slot.module is slot_module(env, name)  # the HF CLIPTextModel / Forge T5 itself
    with forge(assets, "chroma") as env:
        assert env.adapter.describe(Selection()) == "Chroma uses only T5: clip skip has no effect"
        assert env.adapter.describe(sel(4)) == "Chroma uses only T5: clip skip has no effect"


def test_install_is_idempotent_and_uninstall_restores(assets: Assets) -> None:
    with forge(assets, "sd15", install=False) as env:
        from backend.text_processing.classic_engine import ClassicTextProcessingEngine
        from backend.text_processing.t5_engine import T5TextProcessingEngine
        from modules.processing import StableDiffusionProcessing

        targets = [
            (ClassicTextProcessingEngine, "encode_with_transformers"),
            (T5TextProcessingEngine, "encode_with_transformers"),
            (StableDiffusionProcessing, "cached_params"),
        ]
        originals = [getattr(c, f) for c, f in targets]
        env.adapter.install()
        patched = [getattr(c, f) for c, f in targets]
        assert all(p is not o for p, o in zip(patched, originals, strict=True))
        env.adapter.install()
        assert [getattr(c, f) for c, f in targets] == patched
        env.adapter.uninstall()
        assert [getattr(c, f) for c, f in targets] == originals


# ---------------------------------------------------------------------------------------------
# clip skip


@pytest.mark.parametrize("family", ["sd15", "sd20", "sdxl", "sd35", "flux"])
def test_auto_is_bit_identical_to_stock(assets: Assets, family: str) -> None:
    with forge(assets, family, install=False) as env:
        stock = {n: env.encode(None, [PROMPT, NEG], host_clip_skip=n) for n in (1, 3)}
        env.adapter.install()
        for n in (1, 3):
            ours = env.encode(Selection(), [PROMPT, NEG], host_clip_skip=n)  # Forge's slider still works
            if isinstance(ours, dict):
                assert ours.keys() == stock[n].keys()
                for k in ours:
                    assert torch.equal(ours[k], stock[n][k]), k
            else:
                assert torch.equal(ours, stock[n])
        if family != "flux":  # the slider really changes Forge's conds (Flux ignores CLIP hidden states)
            first, third = (stock[n] if isinstance(stock[n], torch.Tensor) else stock[n]["crossattn"] for n in (1, 3))
            assert not torch.equal(first, third)


@pytest.mark.parametrize("n", [1, 2, 5, 12])
def test_sd1_matches_forge_and_diffusers(assets: Assets, n: int) -> None:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipe = SimpleNamespace(
        tokenizer=CLIPTokenizer.from_pretrained(str(assets.root / "tok_l")),
        text_encoder=hf_clip("l", assets.weights["l"]),
    )
    reference, _ = StableDiffusionPipeline.encode_prompt(pipe, PLAIN, "cpu", 1, False, clip_skip=n - 1 or None)
    with forge(assets, "sd15") as env:
        forge_own = env.encode(None, [PLAIN], host_clip_skip=n)
        ours = env.encode(sel(n), [PLAIN], host_clip_skip=1)  # our N reaches the adapter, not opts
    assert torch.equal(ours, forge_own)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_sdxl_matches_forge_and_diffusers(assets: Assets, n: int) -> None:
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    pipe = SimpleNamespace(
        tokenizer=CLIPTokenizer.from_pretrained(str(assets.root / "tok_l")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(assets.root / "tok_g")),
        text_encoder=hf_clip("l", assets.weights["l"]),
        text_encoder_2=hf_clip("g", assets.weights["g"], projection=True),
        config=SimpleNamespace(force_zeros_for_empty_prompt=True),
    )
    embeds, _, pooled, _ = StableDiffusionXLPipeline.encode_prompt(
        pipe, PLAIN, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False, clip_skip=n - 2
    )
    with forge(assets, "sdxl") as env:
        forge_own = env.encode(None, [PLAIN], host_clip_skip=n)
        ours = env.encode(sel(n), [PLAIN])
    for k in ("crossattn", "vector"):
        assert torch.equal(ours[k], forge_own[k]), k
    torch.testing.assert_close(ours["crossattn"], embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["vector"][:, : G_DIMS[0]], pooled, atol=1e-5, rtol=0)


def test_sdxl_skip1_scopes_and_pooled(assets: Assets) -> None:
    ref_l, ref_g = hf_clip("l", assets.weights["l"]), hf_clip("g", assets.weights["g"])
    with forge(assets, "sdxl") as env:
        ids_l, ids_g = clip_ids(env, "clip_l", PLAIN), clip_ids(env, "clip_g", PLAIN)
        native = env.encode(None, [PLAIN], host_clip_skip=1)
        last = env.encode(sel(1), [PLAIN])
        width = L_DIMS[0]
        # N=1: the last layer of both towers, without the final LN (Forge itself cannot go below 2)
        torch.testing.assert_close(last["crossattn"][..., :width], hidden(ref_l, ids_l, 1, ln=False), atol=1e-5, rtol=0)
        torch.testing.assert_close(last["crossattn"][..., width:], hidden(ref_g, ids_g, 1, ln=False), atol=1e-5, rtol=0)
        assert torch.equal(last["vector"], native["vector"])  # pooled: always the final layer
        five = env.encode(None, [PLAIN], host_clip_skip=5)
        only_l = env.encode(sel(5, "clip_l"), [PLAIN])
        only_g = env.encode(sel(5, "clip_g"), [PLAIN])
        assert torch.equal(only_l["crossattn"][..., :width], five["crossattn"][..., :width])
        assert torch.equal(only_l["crossattn"][..., width:], native["crossattn"][..., width:])
        assert torch.equal(only_g["crossattn"][..., :width], native["crossattn"][..., :width])
        assert torch.equal(only_g["crossattn"][..., width:], five["crossattn"][..., width:])
        assert torch.equal(only_l["vector"], native["vector"])
        assert "layer 12/12" in env.adapter.describe(sel(1))
        assert "32/32" in env.adapter.describe(sel(1))


def test_sd3_and_flux_pooled_unchanged(assets: Assets) -> None:
    with forge(assets, "sd35") as env:
        native = env.encode(None, [PLAIN])
        skipped = env.encode(sel(4), [PLAIN])
        forge_own = env.encode(None, [PLAIN], host_clip_skip=4)
        assert torch.equal(skipped["crossattn"], forge_own["crossattn"])
        assert torch.equal(skipped["vector"], native["vector"])
        assert not torch.equal(skipped["crossattn"], native["crossattn"])
    with forge(assets, "flux") as env:
        native = env.encode(None, [PLAIN])
        skipped = env.encode(sel(6), [PLAIN])
        for k in native:
            assert torch.equal(skipped[k], native[k]), k  # Flux uses only CLIP-L's pooled vector
        assert "no effect" in env.adapter.describe(sel(6))


def test_truncated_forward_skips_later_blocks(assets: Assets) -> None:
    from te_switch.hosts.slots import hf_clip_blocks

    with forge(assets, "sdxl") as env:
        ran: dict[str, list[int]] = {"clip_l": [], "clip_g": []}
        handles = [
            block.register_forward_hook(lambda *_, t=tower, i=i: ran[t].append(i))
            for tower in ran
            for i, block in enumerate(hf_clip_blocks(slot_module(env, tower)))
        ]
        full = env.encode(None, [PLAIN], host_clip_skip=4)
        assert ran["clip_l"] == list(range(12))
        ran["clip_l"].clear()
        ran["clip_g"].clear()
        ours = env.encode(sel(4), [PLAIN])
        for h in handles:
            h.remove()
    assert ran["clip_l"] == list(range(9))  # hidden_states[-4] of 12 is block 9's output: blocks 10..12 never run
    assert ran["clip_g"] == list(range(32))  # CLIP-G must also give the pooled vector of its last layer
    assert torch.equal(ours["crossattn"], full["crossattn"])
    assert torch.equal(ours["vector"], full["vector"])


def test_sd2_counts_in_original_layers(assets: Assets) -> None:
    with forge(assets, "sd20") as env:
        from te_switch.hosts.slots import hf_clip_blocks

        assert len(hf_clip_blocks(slot_module(env, "clip_h"))) == 23
        for n, host in ((2, 1), (3, 2), (7, 6)):
            assert torch.equal(env.encode(sel(n), [PLAIN]), env.encode(None, [PLAIN], host_clip_skip=host)), n
        assert torch.equal(env.encode(sel(1), [PLAIN]), env.encode(sel(2), [PLAIN]))
        line = env.adapter.describe(sel(1))
        assert "CLIP-H layer 23/24" in line
        assert "acts as 2" in line
        assert env.adapter.describe(Selection()).endswith("native")  # Forge's default = OpenCLIP-H penultimate


@pytest.mark.parametrize("family", ["sd15", "sd20", "sdxl", "sdxl-refiner", "sd35"])
def test_the_layer_shown_is_the_layer_run(assets: Assets, family: str, tapped_blocks: list) -> None:
    """The effective-layer line and the encode come from one plan (SD2's 23 layers included)."""
    from te_switch.core.selection import SLOT_LABELS
    from te_switch.hosts.slots import hf_clip_blocks

    with forge(assets, family) as env:
        from modules import shared

        blocks = {
            t: hf_clip_blocks(slot_module(env, t))
            for t in ("clip_l", "clip_g", "clip_h")
            if t in env.model.forge_objects.clip.cond_stage_model._modules
        }
        first = next(iter(blocks))
        cases = [(sel(n), 1) for n in (1, 2, 3, 12)]
        cases.append((sel(None, **{first: SlotChoice(None, "fp32")}), 3))  # Auto on a swapped slot: Forge's N
        for selection, host_n in cases:
            shared.opts.set("CLIP_stop_at_last_layers", host_n)
            env.apply(selection)
            plans = env.adapter.plans(selection)
            line = env.adapter.describe(selection)
            tapped_blocks.clear()
            env.encode(selection, [PLAIN], host_clip_skip=host_n)
            # on Auto only the swapped tower goes through our forward; the others run Forge's own code
            ours = [p for p in plans if selection.clip_skip is not None or p.tower == first]
            assert {id(b) for b in tapped_blocks} == {id(blocks[p.tower][p.layer - 1]) for p in ours}, line
            for p in plans:
                assert f"{SLOT_LABELS[p.tower]} layer {p.layer}/{p.layers}" in line
        env.apply(Selection())


def test_auto_plans_follow_forge(assets: Assets) -> None:
    with forge(assets, "sd15") as env:
        from modules import shared

        shared.opts.set("CLIP_stop_at_last_layers", 2)
        assert "CLIP-L layer 11/12" in env.adapter.describe(Selection())
    with forge(assets, "sdxl") as env:
        from modules import shared

        shared.opts.set("CLIP_stop_at_last_layers", 1)
        assert env.adapter.describe(Selection()) == "SDXL · CLIP-L layer 11/12 · CLIP-G layer 31/32 · native"
        shared.opts.set("CLIP_stop_at_last_layers", 4)
        assert "CLIP-L layer 9/12 · CLIP-G layer 29/32" in env.adapter.describe(Selection())
    with forge(assets, "sd35") as env:
        line = env.adapter.describe(Selection())
        assert "CLIP-L layer 12/12 · CLIP-G layer 32/32" in line
        assert "last layer" in line


def test_clip_skip_comes_from_selection_not_opts(assets: Assets) -> None:
    """Forge resets its own slider to 1 (presets, page load); our N still holds, and infotext gets it."""
    with forge(assets, "sd15") as env:
        from modules import processing, shared
        from modules_forge import main_entry

        main_entry.on_preset_change("xl")
        assert shared.opts.CLIP_stop_at_last_layers == 1
        expected = env.encode(None, [PLAIN], host_clip_skip=3)

        class Script:  # what the UI layer does in before_process
            def before_process(self, p: Any) -> None:
                p.override_settings["CLIP_stop_at_last_layers"] = 3
                env.adapter.begin(sel(3))

        p = processing.StableDiffusionProcessingTxt2Img(prompt=PLAIN, negative_prompt="", scripts=Script())
        res = processing.process_images(p)
        env.adapter.end()
        assert torch.equal(p.c, expected)
        assert "Clip skip: 3" in res.infotexts[0]
        assert res.clip_skip == 3
        assert shared.opts.CLIP_stop_at_last_layers == 1  # restored after the generation


# ---------------------------------------------------------------------------------------------
# swaps


def test_swap_encodes_like_the_file_and_restores_bit_identically(assets: Assets) -> None:
    ref = hf_clip("l", assets.weights["l_file"])
    with forge(assets, "sd15") as env:
        native = env.encode(None, [PLAIN])
        module = slot_module(env, "clip_l")
        before = params(module)
        assert env.apply(sel(clip_l="gmp-l")) == ["clip_l"]
        ids = clip_ids(env, "clip_l", PLAIN)
        for n in (1, 3):
            z = env.encode(sel(n, clip_l="gmp-l"), [PLAIN])
            torch.testing.assert_close(z[0], hidden(ref, ids, n, ln=True)[0], atol=1e-5, rtol=0)
        assert torch.equal(env.encode(sel(clip_l="gmp-l"), [PLAIN]), env.encode(None, [PLAIN]))  # Auto = Forge's layer
        assert env.apply(Selection()) == ["clip_l"]
        assert_same(before, params(module))
        assert torch.equal(env.encode(Selection(), [PLAIN]), native)
        assert env.adapter.status()["slots"]["clip_l"]["encoder"] == "Built-in"


@pytest.mark.parametrize(
    ("label", "needle"),
    [("big-g", "cannot go into the CLIP-L slot"), ("truncated", "incomplete"), ("nan", "NaN")],
)
def test_failed_swap_leaves_model_untouched(assets: Assets, label: str, needle: str) -> None:
    from te_switch.core.errors import TESwitchError

    with forge(assets, "sdxl") as env:
        env.encode(None, [PLAIN])
        joint = env.model.forge_objects.clip.cond_stage_model
        before = params(joint)
        with pytest.raises(TESwitchError) as info:
            env.apply(sel(clip_g="big-g", clip_l=label))  # G is fine: nothing may change anywhere
        assert needle in one_line(info.value)
        assert_same(before, params(joint))
        assert env.adapter.engine.epoch == 0


def test_lora_bookkeeping_across_swap(assets: Assets) -> None:
    key = "clip_l.transformer.text_model.encoder.layers.4.self_attn.q_proj.weight"
    with forge(assets, "sd15") as env:
        from backend import memory_management

        joint = env.model.forge_objects.clip.cond_stage_model
        if key not in dict(joint.named_parameters()):
            key = key.replace("text_model.", "")  # transformers >= 5.6 names
        q = lambda: dict(joint.named_parameters())[key]  # noqa: E731
        pristine = q().detach().clone()
        diff = torch.full_like(pristine, 0.25)
        lora_clip = env.model.forge_objects.clip.clone()  # what sd_forge_lora does
        assert lora_clip.add_patches(filename="x.safetensors", patches={key: (diff,)}) == {key}
        env.model.forge_objects.clip = env.model.forge_objects_after_applying_lora.clip = lora_clip
        env.encode(None, [PLAIN])
        assert torch.equal(q(), (pristine.float() + 0.25).half())  # merged by Forge on load
        file_q = assets.weights["l_file"]["text_model.encoder.layers.4.self_attn.q_proj.weight"].half()

        env.apply(sel(clip_l="gmp-l"))
        assert joint.lora_loader.backup == {}
        assert joint.lora_loader.loaded_hash == "[]"
        assert not memory_management.current_loaded_models
        assert torch.equal(q(), file_q)  # the file, not file + LoRA, not LoRA on old weights
        env.encode(None, [PLAIN])  # Forge reloads and merges LoRA onto the new weights
        assert torch.equal(q(), (file_q.float() + 0.25).half())
        assert torch.equal(joint.lora_loader.backup[key], file_q)

        env.apply(Selection())
        assert torch.equal(q(), pristine)
        env.encode(None, [PLAIN])
        assert torch.equal(q(), (pristine.float() + 0.25).half())
        joint.lora_loader.refresh(lora_patches={})  # LoRA removed: the checkpoint's own weight object is back
        assert torch.equal(q(), pristine)


def test_textual_inversion_survives_swap(assets: Assets) -> None:
    with forge(assets, "sd15") as env:
        from backend.text_processing.classic_engine import CLIPEmbeddingForTextualInversion
        from backend.text_processing.textual_inversion import Embedding

        from te_switch.hosts.slots import text_transformer

        engine = env.model.text_processing_engine
        vec = torch.linspace(-1, 1, 2 * L_DIMS[0]).reshape(2, L_DIMS[0])
        emb = Embedding(vec, "tiword")
        emb.vectors = 2
        engine.embeddings.register_embedding(emb)
        env.apply(sel(clip_l="gmp-l"))
        token_embedding = text_transformer(slot_module(env, "clip_l")).embeddings.token_embedding
        assert isinstance(token_embedding, CLIPEmbeddingForTextualInversion)
        assert token_embedding.weight is token_embedding.wrapped.weight
        file_tok = assets.weights["l_file"]["text_model.embeddings.token_embedding.weight"]
        assert torch.equal(token_embedding.weight.float(), file_tok)
        seen = []
        handle = token_embedding.register_forward_hook(lambda m, i, o: seen.append(o))
        env.encode(sel(2, clip_l="gmp-l"), ["a tiword fox"])
        handle.remove()
        assert torch.equal(seen[0][0, 2:4], vec)  # BOS, "a", then the two TI vectors


def test_long_clip_sd1(assets: Assets) -> None:
    long_ref = hf_clip("l", assets.weights["long_file"], positions=248)
    words = " ".join(["fox", "snow", "tree", "light"] * 50)  # 200 tokens
    with forge(assets, "sd15") as env:
        engine = env.model.text_processing_engine
        before = params(slot_module(env, "clip_l"))
        env.apply(sel(clip_l="long-l"))
        assert engine.chunk_length == 246
        assert env.model.get_prompt_lengths_on_ui(words) == (200, 246)
        z = env.encode(sel(clip_l="long-l"), [words])
        assert z.shape == (1, 248, L_DIMS[0])  # one chunk, not three
        ids = clip_ids(env, "clip_l", words)
        torch.testing.assert_close(z, hidden(long_ref, ids, 1, ln=True), atol=1e-5, rtol=0)
        env.apply(Selection())
        assert engine.chunk_length == 75
        assert_same(before, params(slot_module(env, "clip_l")))
        assert env.encode(Selection(), [words]).shape == (1, 231, L_DIMS[0])


def test_long_clip_sdxl_stretches_g(assets: Assets) -> None:
    from te_switch.core.longclip import stretch_positions
    from te_switch.hosts.slots import text_transformer

    words = " ".join(["fox", "snow", "tree", "light"] * 50)
    with forge(assets, "sdxl") as env:
        g = text_transformer(slot_module(env, "clip_g"))
        before = params(slot_module(env, "clip_g"))
        env.apply(sel(clip_l="long-l"))
        assert [e.chunk_length for e in env.adapter._clip_engines(env.model)] == [246, 246]
        table = assets.weights["g"]["text_model.embeddings.position_embedding.weight"]
        assert torch.equal(g.embeddings.position_embedding.weight.float(), stretch_positions(table.half()).float())
        cond = env.encode(sel(clip_l="long-l"), [words, "short"])
        assert cond["crossattn"].shape == (2, 248, L_DIMS[0] + G_DIMS[0])
        env.apply(Selection())
        assert [e.chunk_length for e in env.adapter._clip_engines(env.model)] == [75, 75]
        assert_same(before, params(slot_module(env, "clip_g")))


def test_precision_fp32_is_real(assets: Assets) -> None:
    ref = hf_clip("l", assets.weights["l32_file"])
    with forge(assets, "sd15") as env:
        ids = clip_ids(env, "clip_l", PLAIN)
        expected = hidden(ref, ids, 2, ln=True)
        results = {}
        for precision in ("fp32", "auto", "fp16"):
            env.apply(sel(clip_l=SlotChoice("l32", precision)))
            results[precision] = env.encode(sel(2, clip_l=SlotChoice("l32", precision)), [PLAIN])
            assert results[precision].dtype == torch.float32
        weight = text_transformer_of(env).encoder.layers[0].mlp.fc1.weight
        assert weight.dtype == torch.float16
        env.apply(sel(clip_l=SlotChoice("l32", "fp32")))
        assert text_transformer_of(env).encoder.layers[0].mlp.fc1.weight.dtype == torch.float32
    torch.testing.assert_close(results["fp32"], expected, atol=2e-6, rtol=0)
    assert (results["auto"] - expected).abs().max() > 1e-5  # fp16 storage rounds the file's weights
    assert (results["fp16"] - expected).abs().max() > (results["auto"] - expected).abs().max()


def _with_clip_l(a: Assets, family: str, root: Path, weights: dict[str, torch.Tensor]) -> Path:
    """``family``'s checkpoint with ``weights`` (canonical names, any dtype) as its CLIP-L."""
    from fakes.forge.assets import FAMILIES, _component_state
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, key, projection = FAMILIES[family]["text_encoder"]
    with safe_open(str(a.checkpoints[family]), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("text_encoder.")}  # noqa: SIM118
    state.update({f"text_encoder.{k}": v.contiguous() for k, v in _component_state(key, weights, projection).items()})
    path = root / f"ckpt_{family}_clip_l.safetensors"
    save_file(state, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("encoded_first", [False, True])
@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_clip_auto_equals_forge_loading_the_file(
    assets: Assets, tmp_path: Path, family: str, encoded_first: bool
) -> None:
    """A CLIP-L file swapped in at Auto computes what Forge computes having loaded that file itself: Forge
    stores the whole tower in ``text_encoder_dtype()`` (fp16), and its encode casts the embeddings to fp32
    in place from those fp16 values. That holds whether or not an encode ran before the swap (the live
    embeddings are fp32 after one), with a file whose fp32 values fp16 cannot hold."""
    with forge(assets, family, checkpoint=_with_clip_l(assets, family, tmp_path, assets.weights["l32_file"])) as env:
        expected = env.encode(None, [PLAIN])
    with forge(assets, family) as env:
        if encoded_first:
            env.encode(None, [PLAIN])
        env.apply(sel(clip_l="l32"))
        cond = env.encode(sel(clip_l="l32"), [PLAIN])
    if family == "flux":
        assert torch.equal(cond["vector"], expected["vector"])
        assert torch.equal(cond["crossattn"], expected["crossattn"])
    else:
        assert torch.equal(cond, expected)


def text_transformer_of(env: Env) -> Any:
    from te_switch.hosts.slots import text_transformer

    return text_transformer(slot_module(env, "clip_l"))


def test_cond_cache_not_reused_across_swap(assets: Assets) -> None:
    with forge(assets, "sd15") as env:
        from modules import processing

        def generate(selection: Selection) -> torch.Tensor:
            p = processing.StableDiffusionProcessingTxt2Img(prompt=PLAIN, negative_prompt=NEG)
            env.adapter.apply(selection)
            env.adapter.begin(selection)
            try:
                processing.process_images(p)
            finally:
                env.adapter.end()
            return p.c

        cache = processing.StableDiffusionProcessing.cached_c
        first = generate(Selection())
        assert cache[0] is not None
        assert len(cache) == 3
        assert generate(Selection()) is first  # Forge's cache still works
        swapped = generate(sel(clip_l="gmp-l"))
        assert not torch.equal(swapped, first)
        assert processing.StableDiffusionProcessing.cached_c is cache  # cleared in place, same list
        assert generate(sel(2, clip_l="gmp-l")) is not swapped  # our clip skip is part of the key
        restored = generate(Selection())
        assert torch.equal(restored, first)
        assert restored is not first
        env.adapter.apply(sel(clip_l="gmp-l"))
        assert cache == [None, None, None]
        assert processing.StableDiffusionProcessingTxt2Img.cached_hr_c == [None, None, None]


def test_reapply_after_forge_model_reload(assets: Assets) -> None:
    ref = hf_clip("l", assets.weights["l_file"])
    with forge(assets, "sdxl") as env:
        from modules import script_callbacks, sd_models

        script_callbacks.on_model_loaded(env.adapter.on_model_loaded)
        env.apply(sel(clip_l="long-l"))
        env.apply(sel(clip_l="gmp-l"))
        old = env.model
        sd_models.model_data.forge_loading_parameters = {**sd_models.model_data.forge_loading_parameters, "x": 1}
        new, reloaded = sd_models.forge_model_reload()
        assert reloaded
        assert new is not old
        assert env.adapter.live_model() is new
        env.model = new
        assert env.adapter.status()["slots"]["clip_l"]["encoder"] == "gmp-l"
        assert [e.chunk_length for e in env.adapter._clip_engines(new)] == [75, 75]
        ids = clip_ids(env, "clip_l", PLAIN)
        cond = env.encode(sel(3, clip_l="gmp-l"), [PLAIN])
        torch.testing.assert_close(
            cond["crossattn"][..., : L_DIMS[0]], hidden(ref, ids, 3, ln=False), atol=1e-5, rtol=0
        )


def test_partial_load_is_undone_before_swap(assets: Assets) -> None:
    with forge(assets, "sd15") as env:
        from backend import memory_management

        memory_management.PARTIAL_LOAD = True
        env.encode(None, [PLAIN])
        joint = env.model.forge_objects.clip.cond_stage_model
        assert memory_management.current_loaded_models[0].model_accelerated
        env.apply(sel(clip_l="gmp-l"))
        assert not memory_management.current_loaded_models
        assert not any(hasattr(m, "prev_parameters_manual_cast") for m in joint.modules())
        env.encode(sel(clip_l="gmp-l"), [PLAIN])
        assert memory_management.current_loaded_models[0].model.model is joint  # Forge loaded it again


def test_sd2_accepts_24_layer_clip_h(assets: Assets) -> None:
    with forge(assets, "sd20") as env:
        from te_switch.hosts.slots import hf_clip_blocks

        module = slot_module(env, "clip_h")
        before = params(module)
        env.apply(sel(clip_h="h24"))
        fc = assets.weights["h_file"]["text_model.encoder.layers.22.mlp.fc1.weight"]
        assert torch.equal(hf_clip_blocks(module)[22].mlp.fc1.weight.float(), fc)
        ref = hf_clip("h", assets.weights["h_file"])
        ids = clip_ids(env, "clip_h", PLAIN)
        torch.testing.assert_close(
            env.encode(sel(3, clip_h="h24"), [PLAIN]), hidden(ref, ids, 3, ln=True), atol=1e-5, rtol=0
        )
        env.apply(Selection())
        assert_same(before, params(module))


# ---------------------------------------------------------------------------------------------
# T5


def t5_ids(env: Env, prompt: str) -> torch.Tensor:
    engine = env.model.text_processing_engine_t5
    chunks, _ = engine.tokenize_line(prompt)
    return torch.tensor([chunks[0].tokens])


@pytest.mark.parametrize("family", ["flux", "sd35"])
def test_t5_swap_fp16_file(assets: Assets, family: str) -> None:
    ref = hf_t5(assets.weights["t5_file"])
    with forge(assets, family) as env:
        from modules import shared

        shared.opts.set("sd3_enable_t5", True)
        t5 = slot_module(env, "t5xxl")
        native = env.encode(None, [PLAIN])
        before = params(t5)
        assert env.apply(sel(t5xxl="t5-fp16")) == ["t5xxl"]
        cond = env.encode(sel(t5xxl="t5-fp16"), [PLAIN])
        with torch.no_grad():
            expected = ref(input_ids=t5_ids(env, PLAIN)).last_hidden_state
        t5_part = cond["crossattn"][:, -expected.shape[1] :]
        torch.testing.assert_close(t5_part, expected, atol=1e-4, rtol=1e-4)
        if family == "flux":
            assert torch.equal(cond["vector"][:1], native["vector"])  # CLIP-L untouched
        env.apply(Selection())
        assert_same(before, params(t5))
        restored = env.encode(Selection(), [PLAIN])
        for k in native:
            assert torch.equal(restored[k], native[k]), k


def test_t5_scaled_fp8_file_into_fp16_slot(assets: Assets) -> None:
    from te_switch.core import lowbit

    ref = hf_t5(assets.weights["t5_fp8s_file"])
    with forge(assets, "flux") as env:
        t5 = slot_module(env, "t5xxl")
        env.encode(None, [PLAIN])
        before = params(t5)
        env.apply(sel(t5xxl="t5-fp8s"))
        cond = env.encode(sel(t5xxl="t5-fp8s"), [PLAIN])
        with torch.no_grad():
            expected = ref(input_ids=t5_ids(env, PLAIN)).last_hidden_state
        torch.testing.assert_close(cond["crossattn"], expected, atol=1e-3, rtol=1e-3)
        q = t5.encoder.block[0].layer[0].SelfAttention.q
        # kept compressed in Forge's own Linear layers at Auto precision
        assert lowbit.is_attached(q)
        env.apply(Selection())
        assert not lowbit.is_attached(q)
        assert_same(before, params(t5))


# T5 at Auto = Forge loading the same file itself. The reference is a second code path: the file read the
# way Forge's *VAE / Text Encoder* menu reads it (the fake ``replace_state_dict`` step: a GGUF's names
# renamed, ParameterGGUF weights), built by the fake ``load_huggingface_component`` (GGUF into
# ``ForgeOperationsGGUF`` layers) into a fresh T5 and encoded by a fresh ``T5TextProcessingEngine``.
# Swapped and reference must agree bit for bit.
T5_STORAGES = ["fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2", "fp8_e4m3fn_scaled", "Q8_0", "Q8_0-f16emb"]


def _t5_file(root: Path, storage: str, weights: dict[str, torch.Tensor]) -> Path:
    """One T5 file of ``weights`` in ``storage``, laid out as the files users download are."""
    import filemakers as fm
    from safetensors.torch import save_file
    from synth_gguf import hf_t5_to_llama_names, write_gguf

    if storage.startswith("Q8_0"):
        path = root / f"t5-{storage}.gguf"
        names = hf_t5_to_llama_names(weights)
        qtypes = {n: "Q8_0" for n, v in names.items() if v.dim() == 2 and "rel_b" not in n}
        if storage.endswith("f16emb"):
            qtypes["token_embd.weight"] = "F16"
        write_gguf(path, names, qtypes)
        return path
    if storage == "fp8_e4m3fn_scaled":
        stored, _ = fm.scaled_fp8_state(weights)
    elif storage.startswith("fp8"):
        fp8 = torch.float8_e4m3fn if storage == "fp8_e4m3fn" else torch.float8_e5m2
        stored = {k: v.to(fp8) if v.dim() == 2 and "relative" not in k else v.float() for k, v in weights.items()}
    else:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[storage]
        stored = {k: v.to(dtype) for k, v in weights.items()}
    path = root / f"t5-{storage}.safetensors"
    save_file({k: v.contiguous() for k, v in stored.items()}, str(path))
    return path


def _forge_reads(path: Path) -> dict[str, Any]:
    """The file's tensors as Forge's menu hands them to its loader (Forge's names). For a GGUF with an F16
    token table, which Forge 2.0.1 fails to load, what it would do with that bug fixed (the table as stored)."""
    from backend.loader import _t5_module_state

    return _t5_module_state(str(path), fixed=True)


def forge_encodes_t5(env: Env, path: Path, prompts: list[str]) -> torch.Tensor:
    """Stock Forge's T5 output for ``prompts`` with ``path`` loaded by its own loader (the reference)."""
    from backend.loader import load_huggingface_component
    from backend.text_processing.t5_engine import T5TextProcessingEngine

    model = load_huggingface_component(
        None, "text_encoder_2", "transformers", "T5EncoderModel", str(env.assets.repos["flux"]), _forge_reads(path)
    )
    from backend import memory_management

    memory_management.bake_gguf_model(model)  # what Forge's load_model_gpu does first
    own = env.model.text_processing_engine_t5
    engine = T5TextProcessingEngine(model, own.tokenizer, min_length=own.min_length)
    with torch.inference_mode():
        return engine(prompts)


@pytest.fixture(scope="module")
def t5_files(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from fakes.forge.assets import t5_weights

    root = tmp_path_factory.mktemp("t5_storages")
    weights = t5_weights(45)
    return {storage: _t5_file(root, storage, weights) for storage in T5_STORAGES}


def _with_t5(a: Assets, root: Path, t5: dict[str, torch.Tensor]) -> Path:
    """The Flux checkpoint with its T5 stored as ``t5`` (canonical names), as Forge would hold a menu file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(a.checkpoints["flux"]), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("text_encoder_2.")}  # noqa: SIM118
    state.update({f"text_encoder_2.transformer.{k}": v.contiguous() for k, v in t5.items()})
    path = root / "ckpt_flux_t5.safetensors"
    save_file(state, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("held", ["fp16", "fp8", "scaled-fp8"])
@pytest.mark.parametrize("storage", T5_STORAGES)
def test_t5_auto_equals_forge_loading_the_file(
    assets: Assets, t5_files: dict[str, Path], tmp_path: Path, storage: str, held: str
) -> None:
    """Whatever the slot holds (the checkpoint's fp16 T5, an fp8 or a scaled-fp8 one), a swap at Auto computes
    exactly what Forge computes having loaded that file itself; Built-in gives the slot back bit for bit."""
    checkpoint = None
    if held == "fp8":
        weights = assets.weights["t5"]
        t5 = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 and "relative" not in k else v for k, v in weights.items()}
        checkpoint = _with_t5(assets, tmp_path, t5)
    path = t5_files[storage]
    label = f"t5-{storage}"
    extra = {label: source(path, "t5-xxl", label)}
    with forge(assets, "flux", extra=extra, checkpoint=checkpoint) as env:
        t5 = slot_module(env, "t5xxl")
        if held == "scaled-fp8":  # Forge holding a scaled-fp8 T5: fp8 Linear weights and their scale_weight
            for m in t5.modules():
                if type(m).__name__ == "Linear":
                    m.weight = torch.nn.Parameter((m.weight.detach() * 2).to(torch.float8_e4m3fn), requires_grad=False)
                    m.scale_weight = torch.nn.Parameter(torch.tensor(0.5), requires_grad=False)
        native = env.encode(None, [PLAIN])
        before = params(t5)
        assert env.apply(sel(t5xxl=label)) == ["t5xxl"]
        assert env.adapter.engine.applied(env.adapter.slots(env.model)["t5xxl"]).precision == "auto"
        cond = env.encode(sel(t5xxl=label), [PLAIN, PROMPT])
        expected = forge_encodes_t5(env, path, [PLAIN, PROMPT])
        assert cond["crossattn"].dtype == expected.dtype == torch.float32
        assert torch.equal(cond["crossattn"], expected)
        assert torch.equal(cond["vector"][:1], native["vector"])  # CLIP-L untouched
        env.apply(Selection())
        assert_same(before, params(t5))
        assert torch.equal(env.encode(Selection(), [PLAIN])["crossattn"], native["crossattn"])


def test_t5_gguf_auto_keeps_weights_packed_and_fp32_is_exact(assets: Assets, t5_files: dict[str, Path]) -> None:
    """A GGUF at Auto stays packed in Forge's Linear layers (``shared`` is written into Forge's fp32 table);
    fp32 precision expands the file exactly instead (no fp16 rounding): closer to an exact fp32 encode."""
    from te_switch.core import lowbit
    from te_switch.core.convert import load_tower
    from te_switch.core.tensors import materialize

    path = t5_files["Q8_0"]
    extra = {"q8": source(path, "t5-xxl", "q8")}
    with open_file(str(path)) as src:
        exact = hf_t5(materialize(load_tower(src, extra["q8"].tower), torch.float32))
    with forge(assets, "flux", extra=extra) as env:
        t5 = slot_module(env, "t5xxl")
        env.apply(sel(t5xxl="q8"))
        assert lowbit.is_attached(t5.encoder.block[0].layer[0].SelfAttention.q)
        assert not lowbit.is_attached(t5.shared)
        assert t5.shared.weight.dtype == torch.float32
        auto = env.encode(sel(t5xxl="q8"), [PLAIN])["crossattn"]
        env.apply(sel(t5xxl=SlotChoice("q8", "fp32")))
        fp32 = env.encode(sel(t5xxl=SlotChoice("q8", "fp32")), [PLAIN])["crossattn"]
        with torch.no_grad():
            reference = exact(input_ids=t5_ids(env, PLAIN)).last_hidden_state
        torch.testing.assert_close(fp32, reference, atol=1e-5, rtol=1e-5)
        assert (auto - reference).abs().max() > (fp32 - reference).abs().max()
        env.apply(Selection())


def _objects(module: torch.nn.Module) -> dict[str, tuple[Any, torch.Tensor]]:
    """Every parameter's class, GGUF attributes and bytes (Forge makes new ParameterGGUF objects on every move)."""
    gguf = ("gguf_cls", "real_shape", "computation_dtype", "baked")
    return {
        k: ((type(p), *(getattr(p, a, None) for a in gguf)), p.data.detach().clone())
        for k, p in module.named_parameters()
    }


@pytest.mark.parametrize("storage", ["fp16", "fp8_e4m3fn_scaled", "Q8_0", "Q8_0-f16emb"])
def test_t5_swap_into_a_gguf_held_slot(assets: Assets, t5_files: dict[str, Path], storage: str) -> None:
    """A T5 Forge holds as GGUF (from its menu: ParameterGGUF weights in ForgeOperationsGGUF layers) takes a
    dense, fp8 or GGUF file at Auto, computing what Forge computes with that file; Built-in puts Forge's own
    Parameter objects back untouched; fp32 computes in fp32."""
    from te_switch.core import lowbit
    from te_switch.core.convert import load_tower
    from te_switch.core.tensors import materialize

    menu = t5_files["Q8_0"]
    path = t5_files[storage]
    extra = {"t5": source(path, "t5-xxl", "t5")}
    with forge(assets, "flux", extra=extra, modules=[menu]) as env:
        t5 = slot_module(env, "t5xxl")
        q = t5.encoder.block[0].layer[0].SelfAttention.q
        assert type(q).__qualname__ == "ForgeOperationsGGUF.Linear"
        native = env.encode(None, [PLAIN])
        assert torch.equal(native["crossattn"], forge_encodes_t5(env, menu, [PLAIN]))  # the fake's menu path
        before = _objects(t5)
        assert env.apply(sel(t5xxl="t5")) == ["t5xxl"]
        assert lowbit.is_attached(q)
        cond = env.encode(sel(t5xxl="t5"), [PLAIN, PROMPT])
        assert torch.equal(cond["crossattn"], forge_encodes_t5(env, path, [PLAIN, PROMPT]))
        env.apply(sel(t5xxl=SlotChoice("t5", "fp32")))
        fp32 = env.encode(sel(t5xxl=SlotChoice("t5", "fp32")), [PLAIN])["crossattn"]
        with open_file(str(path)) as src:
            exact = hf_t5(materialize(load_tower(src, extra["t5"].tower), torch.float32))
        with torch.no_grad():
            reference = exact(input_ids=t5_ids(env, PLAIN)).last_hidden_state
        torch.testing.assert_close(fp32, reference, atol=1e-5, rtol=1e-5)
        env.apply(Selection())
        assert not lowbit.is_attached(q)
        after = _objects(t5)
        assert after.keys() == before.keys()
        for k, (obj, data) in before.items():
            assert after[k][0] == obj, k  # a ParameterGGUF as Forge made it
            assert torch.equal(after[k][1], data), k
        assert hasattr(q.weight, "gguf_cls")
        restored = env.encode(Selection(), [PLAIN])
        assert torch.equal(restored["crossattn"], native["crossattn"])


@pytest.mark.parametrize("storage", ["fp16", "fp8_e4m3fn_scaled", "Q8_0"])
def test_chroma_t5_swap_auto_and_restore(assets: Assets, t5_files: dict[str, Path], storage: str) -> None:
    """Chroma's only encoder: its T5 (engine padding to 1 token, no mask) swaps as on Flux — Auto equals Forge
    loading the file, clip skip changes nothing, an explicit fp32 computes in fp32, Built-in is bit-exact."""
    path = t5_files[storage]
    extra = {"t5": source(path, "t5-xxl", "t5")}
    with forge(assets, "chroma", extra=extra) as env:
        t5 = slot_module(env, "t5xxl")
        native = env.encode(None, [PLAIN])
        before = params(t5)
        assert env.apply(sel(t5xxl="t5")) == ["t5xxl"]
        cond = env.encode(sel(t5xxl="t5"), [PROMPT])
        assert cond.shape[1] == len(t5_ids(env, PROMPT)[0])  # padded to 1 token, not 256
        assert torch.equal(cond, forge_encodes_t5(env, path, [PROMPT]))
        assert torch.equal(env.encode(sel(3, t5xxl="t5"), [PROMPT]), cond)
        env.apply(sel(t5xxl=SlotChoice("t5", "fp32")))
        assert t5.encoder.final_layer_norm.weight.dtype == torch.float32
        assert t5.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float32
        env.encode(sel(t5xxl=SlotChoice("t5", "fp32")), [PLAIN])
        env.apply(Selection())
        assert_same(before, params(t5))
        assert torch.equal(env.encode(Selection(), [PLAIN]), native)


def test_flux_long_clip_pools_first_eos_and_fp32_is_exact(assets: Assets) -> None:
    """Flux takes CLIP-L's pooled vector: with Long-CLIP and a ~200-token prompt it comes from the first EOS of
    one 248-position encode. fp32 on both slots equals an fp32 reference encode of the same weights."""
    long_ref = hf_clip("l", assets.weights["long_file"], positions=248)
    t5_ref = hf_t5(assets.weights["t5_file"])
    words = " ".join(["fox", "snow", "tree", "light"] * 50)  # 200 tokens
    choice = sel(clip_l=SlotChoice("long-l", "fp32"), t5xxl=SlotChoice("t5-fp16", "fp32"))
    with forge(assets, "flux") as env:
        native = env.encode(None, [words])
        env.apply(choice)
        assert env.model.text_processing_engine_l.chunk_length == 246
        cond = env.encode(choice, [words])
        ids = clip_ids(env, "clip_l", words)
        assert ids.shape == (1, 248)
        eos = int(ids[0].argmax())
        assert eos == 201  # BOS + 200 words: the first EOS (the padding repeats it)
        with torch.no_grad():
            out = long_ref(ids, output_hidden_states=True)
            t5_expected = t5_ref(input_ids=t5_ids(env, words)).last_hidden_state
        torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, eos], atol=0, rtol=0)
        torch.testing.assert_close(cond["vector"], out.pooler_output, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(cond["crossattn"], t5_expected, atol=1e-6, rtol=1e-5)
        env.apply(Selection())
        assert env.model.text_processing_engine_l.chunk_length == 75
        restored = env.encode(Selection(), [words])
        for k in native:
            assert torch.equal(restored[k], native[k]), k
