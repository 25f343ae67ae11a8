"""The AUTOMATIC1111 1.10 adapter against faithful fakes of A1111, ldm and sgm (tests/fakes/a1111).

Models are built the way A1111 builds them (config → ldm/sgm/SD3 classes → checkpoint file →
``load_model_weights`` → lowvram → hijack → ``on_model_loaded`` → empty-prompt cond) from random
checkpoints with real layer counts (CLIP-L 12, OpenCLIP-H 24, OpenCLIP-G 32) and small widths
(L 64, G 80, H 96). Encoder files use small widths too, so their detected kind is set by hand
(``Env.source``): detection by width is tested elsewhere. References are independent: diffusers'
``encode_prompt``, transformers models loaded from the same files, HF conversions of OpenCLIP towers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import refmodels as rm
import torch
from fakes.a1111.assets import Checkpoints, Env, clean_state, hf_from_open_clip, load
from fakes.harness import fake_webui
from safetensors.torch import save_file

from te_switch.core.errors import TESwitchError
from te_switch.core.longclip import stretch_positions
from te_switch.core.selection import Selection, SlotChoice
from te_switch.hosts.slots import text_transformer
from te_switch.standalone.tokenizers import write_clip_tokenizer

L_WIDTH, G_WIDTH, H_WIDTH = 64, 80, 96
PROMPT = "a red fox sitting in the snow, detailed fur, soft light"
PROMPTS = ["a (red:1.3) fox, [blurry] snow BREAK night sky", " ".join(["word"] * 90) + ", a cat"]
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("a1111-checkpoints"))


@pytest.fixture
def env(checkpoints: Checkpoints, tmp_path: Path) -> Iterator[Env]:
    """A fake A1111 on the CPU with --no-half (fp32 everywhere), like A1111's own CPU test host."""
    with fake_webui("a1111"):
        from modules import devices, shared, shared_options  # noqa: F401

        shared.cmd_opts.no_half = True
        devices.dtype = devices.dtype_unet = devices.dtype_inference = torch.float32
        yield Env(checkpoints, tmp_path)


# ---------------------------------------------------------------------------------------------
# helpers


def encode(model: Any, prompts: list[str], *, negative: bool = False) -> Any:
    """What ``get_conds_with_caching`` runs: the model's conditioning, under A1111's autocast."""
    from modules import devices, prompt_parser

    batch = prompt_parser.SdConditioning(prompts, is_negative_prompt=negative, width=1024, height=1024)
    with torch.no_grad(), devices.autocast():
        return model.get_learned_conditioning(batch)


def parts(cond: Any) -> dict[str, torch.Tensor]:
    return dict(cond) if isinstance(cond, dict) else {"crossattn": cond}


def assert_identical(a: Any, b: Any) -> None:
    a, b = parts(a), parts(b)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"{key} differs by {(a[key].double() - b[key].double()).abs().max():.3g}"


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a.double() - b.double()).abs().max().item()


def assert_fp16_rounding(ours: torch.Tensor, fp32: torch.Tensor) -> None:
    """``ours`` is ``fp32`` computed in fp32 (OpenCLIP vs HF summation order aside) and rounded to fp16."""
    assert ours.dtype == torch.float16
    err = (ours.double() - fp32.double()).abs()
    assert bool((err <= fp32.double().abs() * 2**-10 + 1e-4).all()), f"worst {err.max():.3g}"


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones too: OpenCLIP's attn_mask)."""
    out = {f"param {k}": v.detach().clone() for k, v in module.named_parameters()}
    out.update({f"buffer {k}": v.detach().clone() for k, v in module.named_buffers()})
    return out


def assert_state(before: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    after = state_of(module)
    assert before.keys() == after.keys()
    for key, value in before.items():
        got = after[key]
        assert (got.dtype, tuple(got.shape)) == (value.dtype, tuple(value.shape)), key
        assert torch.equal(got, value), key


def hf_copy(transformer: torch.nn.Module) -> torch.nn.Module:
    """A fresh transformers CLIPTextModel with a live (hijacked) model's weights."""
    from transformers import CLIPTextModel

    ref = CLIPTextModel(copy.deepcopy(transformer.config)).eval()
    ref.load_state_dict(clean_state(transformer))
    return ref


def chunk_tokens(wrapper: Any, prompt: str) -> torch.Tensor:
    """The first chunk's ids exactly as A1111 feeds them (OpenCLIP: id_pad after the first EOS)."""
    chunks, _ = wrapper.tokenize_line(prompt)
    ids = list(chunks[0].tokens)
    if wrapper.id_end != wrapper.id_pad:
        first = ids.index(wrapper.id_end)
        ids = ids[: first + 1] + [wrapper.id_pad] * (len(ids) - first - 1)
    return torch.tensor([ids])


@torch.no_grad()
def hidden(ref: torch.nn.Module, tokens: torch.Tensor, n: int, *, final_ln: bool) -> torch.Tensor:
    out = ref(input_ids=tokens, output_hidden_states=True)
    h = out.hidden_states[-n]
    if final_ln:
        text = getattr(ref, "text_model", ref)
        h = text.final_layer_norm(h)
    return h


def layer_counter(layers: torch.nn.ModuleList) -> tuple[list[int], list[Any]]:
    counts = [0] * len(layers)

    def hook(i: int) -> Any:
        def count(module: torch.nn.Module, args: Any, output: Any) -> None:
            counts[i] += 1

        return count

    return counts, [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]


def with_slot(selection: Selection, **choices: SlotChoice) -> Selection:
    for name, choice in choices.items():
        selection = selection.with_slot(name, choice)
    return selection


# ---------------------------------------------------------------------------------------------
# Auto is stock, bit for bit


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl-refiner", "sd3"])
def test_auto_selection_is_stock_bit_for_bit(env: Env, family: str) -> None:
    from modules.shared import opts

    model = env.load(family, t5=family == "sd3")
    # A1111's own clip-skip settings must keep working exactly as before
    settings = [*{"sd1": [(2, False)], "sdxl": [(3, True)]}.get(family, []), (1, False)]
    stock = {}
    for n, l_skip in settings:
        opts.CLIP_stop_at_last_layers, opts.sdxl_clip_l_skip = n, l_skip
        stock[n] = (
            encode(model, PROMPTS),
            encode(model, ["", "lowres"], negative=True),
            encode(model, [""], negative=True),
        )

    adapter = env.adapter()
    for selection in (None, Selection(), Selection(slots={"clip_l": SlotChoice(), "clip_g": SlotChoice()})):
        if selection is not None:
            adapter.begin(selection)
        for n, l_skip in settings:
            opts.CLIP_stop_at_last_layers, opts.sdxl_clip_l_skip = n, l_skip
            pos, neg, empty = stock[n]
            assert_identical(encode(model, PROMPTS), pos)
            assert_identical(encode(model, ["", "lowres"], negative=True), neg)
            assert_identical(encode(model, [""], negative=True), empty)
        adapter.end()
    if family == "sd1":  # the setting really changed the stock cond, so the comparison above meant something
        assert not torch.equal(stock[1][0], stock[2][0])


# ---------------------------------------------------------------------------------------------
# clip skip against independent references


def test_sd1_clip_skip_matches_diffusers_and_truncates(env: Env) -> None:
    diffusers = pytest.importorskip("diffusers")
    model = env.load("sd1")
    adapter = env.adapter()
    wrapper = model.cond_stage_model
    ref = hf_copy(wrapper.wrapped.transformer)
    if not hasattr(ref, "text_model"):  # transformers >= 5.6; diffusers still reads text_encoder.text_model
        object.__setattr__(ref, "text_model", ref)
    stub = SimpleNamespace(tokenizer=wrapper.wrapped.tokenizer, text_encoder=ref, unet=None)
    layers = text_transformer(wrapper.wrapped.transformer).encoder.layers
    negative = "lowres, blurry"
    neg_tokens = chunk_tokens(wrapper, negative)
    for n in (1, 2, 6, 12):
        adapter.begin(Selection(clip_skip=n))
        counts, hooks = layer_counter(layers)
        ours = encode(model, [PROMPT])
        for h in hooks:
            h.remove()
        with torch.no_grad():
            theirs, _ = diffusers.StableDiffusionPipeline.encode_prompt(stub, PROMPT, CPU, 1, False, clip_skip=n - 1)
        assert max_diff(ours, theirs) <= 1e-5, n
        # the layers after the chosen one never ran
        assert counts == [1] * (13 - n) + [0] * (n - 1), (n, counts)
        # diffusers ignores clip_skip for negatives; A1111 (and we) use the same N
        ours_neg = encode(model, [negative], negative=True)
        assert max_diff(ours_neg, hidden(ref, neg_tokens, n, final_ln=True)) <= 1e-5
        adapter.end()


def test_sd1_truncated_equals_stock_setting(env: Env) -> None:
    from modules.shared import opts

    model = env.load("sd1")
    stock = {}
    for n in (2, 6):
        opts.CLIP_stop_at_last_layers = n
        stock[n] = encode(model, PROMPTS)
    opts.CLIP_stop_at_last_layers = 1
    adapter = env.adapter()
    for n in (2, 6):
        adapter.begin(Selection(clip_skip=n))
        assert_identical(encode(model, PROMPTS), stock[n])
        adapter.end()


def test_sdxl_clip_skip_matches_diffusers_indexing(env: Env) -> None:
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTokenizer

    model = env.load("sdxl")
    adapter = env.adapter()
    l_wrapper, g_wrapper = model.conditioner.embedders[0], model.conditioner.embedders[1]
    tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(str(env.folder / "tok2"), pad_token="!"))
    stub = SimpleNamespace(
        tokenizer=l_wrapper.wrapped.tokenizer,
        tokenizer_2=tokenizer_2,
        text_encoder=hf_copy(l_wrapper.wrapped.transformer),
        text_encoder_2=hf_from_open_clip(g_wrapper.wrapped.model),
        unet=None,
        config=SimpleNamespace(force_zeros_for_empty_prompt=True),
        _execution_device=CPU,
    )
    stock = encode(model, [PROMPT])
    g_counts, hooks = layer_counter(g_wrapper.wrapped.model.transformer.resblocks)
    for n in (1, 2, 4):
        adapter.begin(Selection(clip_skip=n))
        ours = encode(model, [PROMPT])
        adapter.end()
        with torch.no_grad():
            embeds, _, pooled, _ = diffusers.StableDiffusionXLPipeline.encode_prompt(
                stub, PROMPT, device=CPU, num_images_per_prompt=1, do_classifier_free_guidance=False, clip_skip=n - 2
            )
        assert max_diff(ours["crossattn"], embeds) <= 1e-5, n
        assert max_diff(ours["vector"][:, :G_WIDTH], pooled) <= 1e-5, n
        # pooled always comes from the last layer: clip skip leaves the vector bit-identical
        assert torch.equal(ours["vector"], stock["vector"])
        if n == 2:
            assert_identical(ours, stock)  # N=2 is SDXL's native layer: same bits as stock
    for h in hooks:
        h.remove()
    assert set(g_counts) == {3}, "G needs every block for its pooled vector"


def test_sd2_clip_skip_against_hf_conversion(env: Env) -> None:
    model = env.load("sd2")
    adapter = env.adapter()
    wrapper = model.cond_stage_model
    ref = hf_from_open_clip(wrapper.wrapped.model)
    tokens = chunk_tokens(wrapper, PROMPT)
    stock = encode(model, PROMPTS)
    blocks = wrapper.wrapped.model.transformer.resblocks
    for n in (1, 2, 3, 12):
        adapter.begin(Selection(clip_skip=n))
        counts, hooks = layer_counter(blocks)
        ours = encode(model, [PROMPT])
        for h in hooks:
            h.remove()
        assert max_diff(ours, hidden(ref, tokens, n, final_ln=True)) <= 1e-5, n
        assert counts == [1] * (25 - n) + [0] * (n - 1), (n, counts)
        if n == 2:
            assert_identical(encode(model, PROMPTS), stock)
        adapter.end()
    assert wrapper.wrapped.layer_idx == 1  # A1111's own setting is back


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sdxl-refiner"])
def test_the_layer_shown_is_the_layer_run(env: Env, family: str, tapped_blocks: list) -> None:
    """The effective-layer line and the truncated forward come from one plan."""
    from te_switch.core.selection import SLOT_LABELS

    model = env.load(family)
    adapter = env.adapter()
    blocks = {
        n: s.module.transformer.resblocks
        if hasattr(s.module, "positional_embedding")
        else text_transformer(s.module).encoder.layers
        for n, s in adapter.slots(model).items()
    }
    for n in (1, 3, 12):
        selection = Selection(clip_skip=n)
        plans = adapter.plans(selection)
        line = adapter.describe(selection)
        tapped_blocks.clear()
        adapter.begin(selection)
        encode(model, [PROMPT])
        adapter.end()
        assert {id(b) for b in tapped_blocks} == {id(blocks[p.tower][p.layer - 1]) for p in plans}, line
        for p in plans:
            assert f"{SLOT_LABELS[p.tower]} layer {p.layer}/{p.layers}" in line


def test_scope_limits_clip_skip_to_one_sdxl_tower(env: Env) -> None:
    model = env.load("sdxl")
    stock = encode(model, [PROMPT])
    adapter = env.adapter()
    l_part, g_part = (..., slice(0, L_WIDTH)), (..., slice(L_WIDTH, None))
    for scope, l_changes, g_changes in (("clip_l", True, False), ("clip_g", False, True), ("both", True, True)):
        adapter.begin(Selection(clip_skip=5, scope=scope))
        ours = encode(model, [PROMPT])
        adapter.end()
        assert torch.equal(ours["crossattn"][l_part], stock["crossattn"][l_part]) is not l_changes, scope
        assert torch.equal(ours["crossattn"][g_part], stock["crossattn"][g_part]) is not g_changes, scope
        assert torch.equal(ours["vector"], stock["vector"]), scope


def test_refiner_clip_skip_ignores_scope(env: Env) -> None:
    model = env.load("sdxl-refiner")
    stock = encode(model, [PROMPT])
    adapter = env.adapter()
    assert adapter.family(model) == "sdxl-refiner"
    assert list(adapter.slots(model)) == ["clip_g"]
    adapter.begin(Selection(clip_skip=4, scope="clip_l"))  # one tower: the scope has nothing to choose
    ours = encode(model, [PROMPT])
    adapter.end()
    assert not torch.equal(ours["crossattn"], stock["crossattn"])
    assert torch.equal(ours["vector"], stock["vector"])


# ---------------------------------------------------------------------------------------------
# swaps


def test_sd1_swap_matches_transformers_and_restores_bit_for_bit(env: Env) -> None:
    model = env.load("sd1")
    adapter = env.adapter()
    wrapper = model.cond_stage_model
    before = state_of(model)
    stock = encode(model, PROMPTS)
    label, ref = env.clip_l_file(7)
    assert adapter.apply(Selection().with_slot("clip_l", SlotChoice(label))) == ["clip_l"]
    tokens = chunk_tokens(wrapper, PROMPT)
    with torch.no_grad():
        expected = ref(input_ids=tokens).last_hidden_state
    assert max_diff(encode(model, [PROMPT]), expected) <= 1e-5
    assert adapter.status()["slots"]["clip_l"]["encoder"] == label
    assert adapter.apply(Selection()) == ["clip_l"]
    assert_state(before, model)
    assert_identical(encode(model, PROMPTS), stock)


def test_sd2_swap_and_restore(env: Env) -> None:
    model = env.load("sd2")
    adapter = env.adapter()
    before = state_of(model)
    stock = encode(model, PROMPTS)
    label, ref = env.open_clip_file("ViT-H-14", 8)
    adapter.apply(Selection().with_slot("clip_h", SlotChoice(label)))
    tokens = chunk_tokens(model.cond_stage_model, PROMPT)
    assert max_diff(encode(model, [PROMPT]), hidden(ref, tokens, 2, final_ln=True)) <= 1e-5
    adapter.apply(Selection())
    assert_state(before, model)
    assert_identical(encode(model, PROMPTS), stock)


def test_sdxl_swap_both_towers_and_restore(env: Env) -> None:
    model = env.load("sdxl")
    adapter = env.adapter()
    before = state_of(model)
    stock = encode(model, PROMPTS)
    l_label, l_ref = env.clip_l_file(9)
    g_label, g_ref = env.open_clip_file("ViT-bigG-14", 10, layout="hf")  # HF names → OpenCLIP's fused in_proj
    selection = with_slot(Selection(), clip_l=SlotChoice(l_label), clip_g=SlotChoice(g_label))
    assert sorted(adapter.apply(selection)) == ["clip_g", "clip_l"]
    l_wrapper, g_wrapper = model.conditioner.embedders[0], model.conditioner.embedders[1]
    ours = encode(model, [PROMPT])
    l_tokens, g_tokens = chunk_tokens(l_wrapper, PROMPT), chunk_tokens(g_wrapper, PROMPT)
    assert max_diff(ours["crossattn"][..., :L_WIDTH], hidden(l_ref, l_tokens, 2, final_ln=False)) <= 1e-5
    assert max_diff(ours["crossattn"][..., L_WIDTH:], hidden(g_ref, g_tokens, 2, final_ln=False)) <= 1e-5
    with torch.no_grad():
        assert max_diff(ours["vector"][:, :G_WIDTH], g_ref(input_ids=g_tokens).text_embeds) <= 1e-5
    adapter.apply(Selection())
    assert_state(before, model)
    assert_identical(encode(model, PROMPTS), stock)


def test_refiner_swap_and_restore(env: Env) -> None:
    model = env.load("sdxl-refiner")
    adapter = env.adapter()
    before = state_of(model)
    label, ref = env.open_clip_file("ViT-bigG-14", 11)
    adapter.apply(Selection().with_slot("clip_g", SlotChoice(label)))
    tokens = chunk_tokens(model.conditioner.embedders[0], PROMPT)
    ours = encode(model, [PROMPT])
    assert max_diff(ours["crossattn"], hidden(ref, tokens, 2, final_ln=False)) <= 1e-5
    adapter.apply(Selection())
    assert_state(before, model)


def test_sd3_slots_swaps_and_clip_skip(env: Env) -> None:
    from modules import shared

    model = env.load("sd3")
    adapter = env.adapter()
    assert list(adapter.slots(model)) == ["clip_l", "clip_g"]  # sd3_enable_t5 off: no T5 module, no slot
    assert "T5 off" in adapter.describe(Selection())

    model = env.load("sd3", t5=True)
    shared.opts.sd3_enable_t5 = True
    assert list(adapter.slots(model)) == ["clip_l", "clip_g", "t5xxl"]
    before = state_of(model)
    stock = encode(model, [PROMPT])
    lg = model.text_encoders.model_lg
    l_tokens = chunk_tokens(lg, PROMPT)
    g_tokens = l_tokens.clone()
    g_tokens[0, l_tokens[0].tolist().index(lg.id_end) + 1 :] = 0  # Sd3ClipLG pads G with 0

    # clip skip through A1111's own SDClipModel layer option; pooled (L and G) stays the last layer's
    l_ref, g_ref = (
        sd3_hf_copy(model.text_encoders.clip_l.transformer, "quick_gelu"),
        sd3_hf_copy(model.text_encoders.clip_g.transformer, "gelu"),
    )
    adapter.begin(Selection(clip_skip=3))
    ours = encode(model, [PROMPT])
    adapter.end()
    assert max_diff(ours["crossattn"][0, :77, :L_WIDTH], hidden(l_ref, l_tokens, 3, final_ln=False)[0]) <= 1e-5
    assert (
        max_diff(ours["crossattn"][0, :77, L_WIDTH : L_WIDTH + G_WIDTH], hidden(g_ref, g_tokens, 3, final_ln=False)[0])
        <= 1e-5
    )
    assert torch.equal(ours["vector"], stock["vector"])
    assert model.text_encoders.clip_l.layer_idx == -2
    assert model.text_encoders.clip_g.layer_idx == -2

    l_label, l_file_ref = env.clip_l_file(12)
    g_label, g_file_ref = env.open_clip_file("ViT-bigG-14", 13, layout="hf")
    t5_label, t5_ref = env.t5_file(14)
    selection = with_slot(
        Selection(), clip_l=SlotChoice(l_label), clip_g=SlotChoice(g_label), t5xxl=SlotChoice(t5_label)
    )
    assert sorted(adapter.apply(selection)) == ["clip_g", "clip_l", "t5xxl"]
    ours = encode(model, [PROMPT])
    assert max_diff(ours["crossattn"][0, :77, :L_WIDTH], hidden(l_file_ref, l_tokens, 2, final_ln=False)[0]) <= 1e-5
    assert (
        max_diff(
            ours["crossattn"][0, :77, L_WIDTH : L_WIDTH + G_WIDTH], hidden(g_file_ref, g_tokens, 2, final_ln=False)[0]
        )
        <= 1e-5
    )
    t5_tokens, _ = model.text_encoders.model_t5.tokenize_line(PROMPT, target_token_count=77)
    with torch.no_grad():
        t5_expected = t5_ref(input_ids=torch.tensor([t5_tokens])).last_hidden_state
    assert max_diff(ours["crossattn"][0, 77:], t5_expected[0]) <= 1e-4
    adapter.apply(Selection())
    assert_state(before, model)
    assert_identical(encode(model, [PROMPT]), stock)

    # Long-CLIP: SD3's CLIPs add their whole position table, so both must have 248 rows
    g_embeddings = model.text_encoders.clip_g.transformer.text_model.embeddings
    g_table = g_embeddings.position_embedding.weight.detach().clone()
    long_label, long_ref = env.clip_l_file(25, positions=248)
    assert sorted(adapter.apply(Selection().with_slot("clip_l", SlotChoice(long_label)))) == ["clip_g", "clip_l"]
    assert torch.equal(g_embeddings.position_embedding.weight, stretch_positions(g_table))
    assert lg.chunk_length == 246
    long_prompt = " ".join(["cat"] * 200)
    assert model.text_encoders.get_token_count(long_prompt) == 200
    cond = encode(model, [long_prompt])
    assert cond["crossattn"].shape == (1, 2 * 248, 192)  # L+G 248 tokens, then T5 padded to the same count
    long_tokens = chunk_tokens(lg, long_prompt)
    assert max_diff(cond["crossattn"][0, :248, :L_WIDTH], hidden(long_ref, long_tokens, 2, final_ln=False)[0]) <= 1e-5
    adapter.apply(Selection())
    assert lg.chunk_length == 75
    assert_state(before, model)


def sd3_hf_copy(transformer: torch.nn.Module, act: str) -> torch.nn.Module:
    """transformers CLIPTextModel with the weights of A1111's own SD3 CLIP."""
    from transformers import CLIPTextModel

    text = transformer.text_model
    width = text.final_layer_norm.weight.shape[0]
    config = rm.hf_clip_config(width, len(text.encoder.layers), text.encoder.layers[0].self_attn.heads, act=act)
    ref = CLIPTextModel(config).eval()
    sd = {k: v for k, v in transformer.state_dict().items() if not k.startswith("text_projection")}
    rm.load_canonical_into_hf(ref, sd)
    return ref


def test_failed_swap_leaves_the_model_untouched(env: Env) -> None:
    model = env.load("sdxl")
    adapter = env.adapter()
    before = state_of(model)
    l_label, _ = env.clip_l_file(15)
    for seed, problem in enumerate(("wrong kind", "truncated", "nan"), 16):
        g_label, _ = env.open_clip_file("ViT-bigG-14", seed)
        path = Path(env.sources[g_label].path)
        if problem == "wrong kind":
            selection = with_slot(Selection(), clip_l=SlotChoice(g_label))  # a CLIP-G file in the CLIP-L slot
        else:
            if problem == "truncated":
                path.write_bytes(path.read_bytes()[:-4096])
            else:
                sd = load(path)
                sd["transformer.resblocks.30.mlp.c_fc.weight"][3, 5] = float("nan")
                save_file(sd, str(path))
            # the good L file must not be applied either: the swap is atomic across slots
            selection = with_slot(Selection(), clip_l=SlotChoice(l_label), clip_g=SlotChoice(g_label))
        with pytest.raises(TESwitchError) as err:
            adapter.apply(selection)
        message = str(err.value)
        assert message, problem
        assert "\n" not in message, problem
        assert {"wrong kind": "clip-g", "truncated": g_label, "nan": "NaN"}[problem] in message, message
        assert_state(before, model)
        assert adapter.status()["slots"]["clip_l"]["encoder"] == "Built-in"
        assert adapter.engine.epoch == 0


def test_swap_keeps_lowvram_hook_ti_wrapper_and_lora_bookkeeping(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from modules import lowvram, sd_hijack, shared

    shared.cmd_opts.medvram = True
    model = env.load("sd1")
    adapter = env.adapter()
    wrapper = model.cond_stage_model
    transformer = wrapper.wrapped.transformer
    embeddings = (transformer.text_model if hasattr(transformer, "text_model") else transformer).embeddings
    ti_wrapper = embeddings.token_embedding
    assert isinstance(ti_wrapper, sd_hijack.EmbeddingsWithFixes)

    # LoRA resets its cached weights from the patched _load_from_state_dict of each layer type
    resets: dict[int, int] = {}
    original = torch.nn.Linear._load_from_state_dict

    def counting(self: torch.nn.Linear, *args: Any, **kwargs: Any) -> Any:
        resets[id(self)] = resets.get(id(self), 0) + 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Linear, "_load_from_state_dict", counting)
    label, ref = env.clip_l_file(18)
    adapter.apply(Selection().with_slot("clip_l", SlotChoice(label)))
    linears = [m for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    assert all(resets.get(id(m)) == 1 for m in linears)

    assert embeddings.token_embedding is ti_wrapper  # same object: the hijack is intact
    lowvram.moves.clear()
    encode(model, [PROMPT])
    assert lowvram.moves
    assert lowvram.moves[0] is model.cond_stage_model.wrapped

    # textual inversion still splices its vectors into the swapped tower
    vec = torch.randn(2, L_WIDTH, generator=torch.Generator().manual_seed(3))
    add_embedding(model, "tiword", vec)
    ours = encode(model, ["a tiword cat"])
    tokens = chunk_tokens(wrapper, "a tiword cat")
    assert tokens[0, 2:4].tolist() == [0, 0]  # placeholders at offset 1 (after BOS and "a")
    assert max_diff(ours, spliced_reference(ref, tokens, {1: vec})) <= 1e-5

    adapter.apply(Selection())
    assert all(resets.get(id(m)) == 2 for m in linears)
    assert embeddings.token_embedding is ti_wrapper


def add_embedding(model: Any, name: str, vec: torch.Tensor) -> None:
    from modules import sd_hijack
    from modules.textual_inversion.textual_inversion import Embedding

    embedding = Embedding(vec, name)
    embedding.vectors = vec.shape[0]
    sd_hijack.model_hijack.embedding_db.register_embedding(embedding, model)


@torch.no_grad()
def spliced_reference(ref: torch.nn.Module, tokens: torch.Tensor, fixes: dict[int, torch.Tensor]) -> torch.Tensor:
    """``ref``'s last hidden state with TI vectors written over the token embeddings (own oracle)."""
    text = getattr(ref, "text_model", ref)
    table = text.embeddings.token_embedding
    embedded = table(tokens)
    for offset, vec in fixes.items():
        embedded[0, offset + 1 : offset + 1 + vec.shape[0]] = vec

    class Spliced(torch.nn.Module):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return embedded

    text.embeddings.token_embedding = Spliced()
    try:
        return ref(input_ids=tokens).last_hidden_state
    finally:
        text.embeddings.token_embedding = table


# ---------------------------------------------------------------------------------------------
# Long-CLIP


def test_long_clip_on_sd1_one_chunk_of_248(env: Env) -> None:
    from modules import extra_networks, sd_hijack

    model = env.load("sd1")
    adapter = env.adapter()
    before = state_of(model)
    wrapper = model.cond_stage_model
    long_prompt = " ".join(["cat"] * 200)
    assert sd_hijack.model_hijack.get_prompt_lengths(long_prompt) == (200, 225)

    label, ref = env.clip_l_file(19, positions=248)
    adapter.apply(Selection().with_slot("clip_l", SlotChoice(label)))
    assert (wrapper.chunk_length, wrapper.wrapped.max_length) == (246, 248)
    assert sd_hijack.model_hijack.get_prompt_lengths(long_prompt) == (200, 246)
    assert sd_hijack.model_hijack.get_prompt_lengths(" ".join(["cat"] * 300)) == (300, 492)
    assert model.cond_stage_model_empty_prompt.shape[1] == 248  # pad_cond_uncond divides by it

    ours = encode(model, [long_prompt])
    assert ours.shape == (1, 248, L_WIDTH)
    tokens = chunk_tokens(wrapper, long_prompt)
    with torch.no_grad():
        assert max_diff(ours, ref(input_ids=tokens).last_hidden_state) <= 1e-5
    assert encode(model, ["a cat BREAK a dog"]).shape == (1, 496, L_WIDTH)

    # token weights land on their tokens inside the long chunk (A1111's emphasis, mean kept)
    weighted = " ".join(["cat"] * 150) + " (red fox:1.4) [snow]"
    chunks, _ = wrapper.tokenize_line(weighted)
    multipliers = torch.tensor([chunks[0].multipliers])
    assert len(chunks) == 1
    assert multipliers[0, 151:153].tolist() == pytest.approx([1.4, 1.4])
    with torch.no_grad():
        z = ref(input_ids=chunk_tokens(wrapper, weighted)).last_hidden_state
    expected = z * multipliers[..., None]
    expected = expected * (z.mean() / expected.mean())
    assert max_diff(encode(model, [weighted]), expected) <= 1e-5

    # a TI embedding past token 75 stays in the first (246-token) chunk
    vec = torch.randn(3, L_WIDTH, generator=torch.Generator().manual_seed(4))
    add_embedding(model, "tiword", vec)
    ti_prompt = " ".join(["cat"] * 100) + " tiword dog"
    chunks, count = wrapper.tokenize_line(ti_prompt)
    assert (len(chunks), count, chunks[0].fixes[0].offset) == (1, 104, 100)
    assert (
        max_diff(encode(model, [ti_prompt]), spliced_reference(ref, chunk_tokens(wrapper, ti_prompt), {100: vec}))
        <= 1e-5
    )

    # inside a generation the empty-prompt cond is encoded without resetting the extra networks
    activations = len(extra_networks.activations)
    adapter.begin(Selection())
    adapter.apply(Selection())
    adapter.end()
    assert len(extra_networks.activations) == activations
    assert (wrapper.chunk_length, wrapper.wrapped.max_length) == (75, 77)
    assert model.cond_stage_model_empty_prompt.shape[1] == 77
    assert sd_hijack.model_hijack.get_prompt_lengths(long_prompt) == (200, 225)
    assert_state(before, model)


def test_long_clip_on_sdxl_stretches_g(env: Env) -> None:
    from modules import sd_hijack

    model = env.load("sdxl")
    adapter = env.adapter()
    before = state_of(model)
    g_model = model.conditioner.embedders[1].wrapped.model
    g_table = g_model.positional_embedding.detach().clone()
    label, _ = env.clip_l_file(20, positions=248)
    assert sorted(adapter.apply(Selection().with_slot("clip_l", SlotChoice(label)))) == ["clip_g", "clip_l"]

    assert torch.equal(g_model.positional_embedding, stretch_positions(g_table))
    assert tuple(g_model.attn_mask.shape) == (248, 248)
    l_wrapper, g_wrapper = model.conditioner.embedders[0], model.conditioner.embedders[1]
    assert (l_wrapper.chunk_length, g_wrapper.chunk_length) == (246, 246)
    assert sd_hijack.model_hijack.get_prompt_lengths(" ".join(["cat"] * 200)) == (200, 246)
    cond = encode(model, [" ".join(["cat"] * 200), "a dog"])
    assert cond["crossattn"].shape == (2, 248, L_WIDTH + G_WIDTH)  # both towers agree on the length
    assert adapter.status()["slots"]["clip_g"]["positions"] == 248

    adapter.apply(Selection())
    assert (l_wrapper.chunk_length, g_wrapper.chunk_length) == (75, 75)
    assert tuple(g_model.attn_mask.shape) == (77, 77)
    assert_state(before, model)


def test_long_clip_survives_redo_hijack_and_vae_reload(env: Env) -> None:
    from modules import script_callbacks, sd_hijack

    model = env.load("sd1")
    adapter = env.adapter()
    label, _ = env.clip_l_file(21, positions=248)
    selection = Selection().with_slot("clip_l", SlotChoice(label))
    adapter.apply(selection)
    old = model.cond_stage_model
    sd_hijack.model_hijack.redo_hijack(model)  # an attention-optimisation change: new wrappers, no callback
    assert model.cond_stage_model is not old
    assert model.cond_stage_model.chunk_length == 75
    adapter.begin(selection)
    assert model.cond_stage_model.chunk_length == 246
    assert encode(model, [" ".join(["cat"] * 200)]).shape == (1, 248, L_WIDTH)
    adapter.end()

    # a VAE change: undo_hijack → load the VAE → hijack → on_model_loaded, the encoder untouched
    sd_hijack.model_hijack.undo_hijack(model)
    sd_hijack.model_hijack.hijack(model)
    assert model.cond_stage_model.chunk_length == 75
    script_callbacks.model_loaded_callback(model)
    assert model.cond_stage_model.chunk_length == 246
    assert adapter.engine.epoch == 1  # nothing was loaded again


# ---------------------------------------------------------------------------------------------
# precision


def test_fp32_slot_computes_in_fp32_on_an_fp16_host(env: Env) -> None:
    from modules import devices, shared

    shared.cmd_opts.no_half = False
    devices.dtype = devices.dtype_unet = devices.dtype_inference = torch.float16
    model = env.load("sdxl")
    adapter = env.adapter()
    before = state_of(model)
    l_wrapper, g_wrapper = model.conditioner.embedders[0], model.conditioner.embedders[1]
    l_ref, g_ref = hf_copy(l_wrapper.wrapped.transformer).float(), hf_from_open_clip(g_wrapper.wrapped.model).float()
    tokens = chunk_tokens(l_wrapper, PROMPT)

    def tower_outputs() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), devices.autocast():
            return l_wrapper.encode_with_transformers(tokens), g_wrapper.encode_with_transformers(
                chunk_tokens(g_wrapper, PROMPT)
            )

    l16, _ = tower_outputs()
    l_expected = hidden(l_ref, tokens, 2, final_ln=False).to(torch.float16)
    assert max_diff(l16, l_expected) > 1e-3  # fp16 compute really differs from fp32

    selection = with_slot(Selection(), clip_l=SlotChoice(precision="fp32"), clip_g=SlotChoice(precision="fp32"))
    adapter.apply(selection)
    assert l_wrapper.wrapped.transformer.get_input_embeddings().wrapped.weight.dtype == torch.float32
    l32, g32 = tower_outputs()
    assert (l32.dtype, g32.dtype, g32.pooled.dtype) == (torch.float16,) * 3
    assert torch.equal(l32, l_expected)
    g_tokens = chunk_tokens(g_wrapper, PROMPT)
    assert_fp16_rounding(g32, hidden(g_ref, g_tokens, 2, final_ln=False))
    with torch.no_grad():
        assert_fp16_rounding(g32.pooled, g_ref(input_ids=g_tokens).text_embeds)
    assert not torch.equal(l32, l16)

    # GPUs without autocast (and MPS/XPU): A1111 patches the layer classes to cast to fp16 instead
    devices.use_manual_cast = True
    l_manual, _ = tower_outputs()
    assert torch.equal(l_manual, l_expected)
    devices.use_manual_cast = False
    assert not hasattr(torch.nn.Linear, "org_forward")  # A1111's patch is gone again, ours too

    adapter.apply(Selection())
    assert_state(before, model)


# ---------------------------------------------------------------------------------------------
# cond cache, reloads, bookkeeping


def test_cond_cache_reused_only_while_nothing_changed(env: Env) -> None:
    from modules import processing

    env.load("sd1")  # processing reads shared.sd_model, as in A1111
    adapter = env.adapter()
    selection = Selection()

    def generate() -> Any:
        p = processing.StableDiffusionProcessingTxt2Img(prompt=PROMPT, negative_prompt="lowres", steps=20)
        adapter.begin(selection)
        p.setup_prompts()
        p.setup_conds()
        adapter.end()
        return p

    first = generate()
    second = generate()
    assert second.c is first.c
    assert second.uc is first.uc
    key = first.cached_params(first.prompts, 20, {})

    label, _ = env.clip_l_file(22)
    adapter.apply(Selection().with_slot("clip_l", SlotChoice(label)))
    assert processing.StableDiffusionProcessing.cached_c == [None, None]  # cleared in place
    assert first.cached_c is processing.StableDiffusionProcessing.cached_c
    third = generate()
    assert third.c is not first.c
    assert third.cached_params(third.prompts, 20, {}) != key

    # even a cache nobody cleared cannot serve a cond from before a swap: the key carries the epoch
    adapter.apply(Selection())
    processing.StableDiffusionProcessing.cached_c[:] = [third.cached_params(third.prompts, 20, {}), third.c]
    restored = generate()
    assert restored.c is not third.c
    assert torch.equal(restored.c.batch[0][0].schedules[0].cond, first.c.batch[0][0].schedules[0].cond)
    assert generate().c is restored.c

    # so does the running selection (clip skip, scope, per-slot choices)
    selection = Selection(clip_skip=3)
    skipped = generate()
    assert skipped.c is not restored.c
    assert not torch.equal(skipped.c.batch[0][0].schedules[0].cond, restored.c.batch[0][0].schedules[0].cond)

    # A1111's own key lacks "Clip skip SDXL"; ours carries it
    from modules.shared import opts

    without = skipped.cached_params(skipped.prompts, 20, {})
    opts.sdxl_clip_l_skip = True
    assert skipped.cached_params(skipped.prompts, 20, {}) != without


def test_same_config_reload_restores_first_then_reapplies(env: Env) -> None:
    from modules import sd_models

    model = env.load("sd1")
    adapter = env.adapter()
    label, _ = env.clip_l_file(23, positions=248)
    selection = Selection().with_slot("clip_l", SlotChoice(label))
    adapter.apply(selection)

    other = env.info("sd1", seed=1)
    reloaded = sd_models.reload_model_weights(info=other)
    assert reloaded is model  # same config: weights went into the same object
    assert model.cond_stage_model.chunk_length == 246  # the new wrapper, via on_model_loaded
    assert adapter.status()["slots"]["clip_l"]["encoder"] == label
    # Built-in now means the new checkpoint's encoder
    adapter.apply(Selection())
    expected = {k: v for k, v in load(env.checkpoints.path("sd1", 1)).items() if k.startswith("cond_stage_model.")}
    live = {
        f"cond_stage_model.{k}".replace(".wrapped.", "."): v
        for k, v in model.cond_stage_model.wrapped.state_dict().items()
    }
    assert expected.keys() <= live.keys()
    assert all(torch.equal(live[k], v) for k, v in expected.items())

    # without the restore, A1111's own reload chokes on the 248-row table
    adapter.apply(selection)
    adapter.uninstall()
    with pytest.raises(RuntimeError, match="size mismatch"):
        sd_models.reload_model_weights(info=env.info("sd1", seed=0))


def test_restore_before_load_on_an_unhijacked_model(env: Env) -> None:
    from modules import sd_hijack

    model = env.load("sd1")
    adapter = env.adapter()
    before = state_of(model.cond_stage_model.wrapped)
    label, _ = env.clip_l_file(24, positions=248)
    adapter.apply(Selection().with_slot("clip_l", SlotChoice(label)))
    sd_hijack.model_hijack.undo_hijack(model)  # what reload_model_weights does first
    assert adapter.restore_before_load(model) == ["clip_l"]
    sd_hijack.model_hijack.hijack(model)
    assert_state(before, model.cond_stage_model.wrapped)  # the token embedding too, under its hijacked name


def test_family_plans_and_notes(env: Env) -> None:
    from modules import sd_models, shared
    from modules.shared import opts

    adapter = env.adapter(install=False)
    assert adapter.live_model() is None
    assert adapter.describe(Selection()).startswith("No model")
    model = env.load("sd1")
    shared.sd_model = object()  # the real one is a property that loads a model: never read
    assert adapter.live_model() is sd_models.model_data.sd_model is model
    assert adapter.describe(Selection()) == "SD1 · CLIP-L layer 12/12 · native"
    opts.CLIP_stop_at_last_layers = 2
    assert adapter.describe(Selection()) == "SD1 · CLIP-L layer 11/12 · from A1111's Clip skip setting"
    assert adapter.describe(Selection(clip_skip=4)) == "SD1 · CLIP-L layer 9/12 · replaces A1111's Clip skip setting"

    model = env.load("sdxl")
    opts.CLIP_stop_at_last_layers, opts.sdxl_clip_l_skip = 3, True
    plans = {p.tower: p for p in adapter.auto_plans(model, "sdxl")}
    assert (plans["clip_l"].layer, plans["clip_l"].final_ln, plans["clip_g"].layer) == (10, False, 31)
    opts.sdxl_clip_l_skip = False
    assert adapter.describe(Selection()) == "SDXL · CLIP-L layer 11/12 · CLIP-G layer 31/32 · native"

    # alt-diffusion's XLM-R text model: no CLIP, nothing to offer
    xlmr = SimpleNamespace(cond_stage_model=SimpleNamespace(roberta=torch.nn.Linear(2, 2)), is_sd1=True)
    assert adapter.family(xlmr) is None
    assert adapter.slots(xlmr) == {}


def test_install_is_idempotent_and_uninstall_restores(env: Env) -> None:
    from modules import patches, processing, sd_hijack_clip, sd_models

    originals = (
        sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords.encode_with_transformers,
        processing.StableDiffusionProcessing.cached_params,
        sd_models.load_model_weights,
    )
    adapter = env.adapter()
    adapter.install()
    assert sd_models.load_model_weights is not originals[2]
    successor = env.adapter()  # a re-imported module installs over what the old one left
    successor.uninstall()
    current = (
        sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords.encode_with_transformers,
        processing.StableDiffusionProcessing.cached_params,
        sd_models.load_model_weights,
    )
    assert current == originals
    assert not any(patches.originals[key] for key in list(patches.originals))
