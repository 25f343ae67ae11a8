"""The diffusers host adapter on real (tiny) pipelines.

Oracles are independent of the adapter: diffusers' own ``encode_prompt``, and transformers
``CLIPTextModel`` forwards with ``output_hidden_states=True`` on weights read from the files here.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from te_switch.core.detect import inspect_path
from te_switch.core.errors import TESwitchError
from te_switch.core.library import EncoderLibrary
from te_switch.core.selection import Selection, SlotChoice
from te_switch.hosts.diffusers import DiffusersAdapter, pipeline_family
from te_switch.hosts.engine import EncoderSource
from te_switch.standalone import demo
from te_switch.standalone.generate import generate
from te_switch.standalone.pipeline import load_pipeline
from te_switch.standalone.resolver import EncoderResolver
from te_switch.standalone.tokenizers import write_clip_tokenizer


def clip_tokenizer(folder: str, *, pad_token: str = "<|endoftext|>") -> Any:
    """A transformers ``CLIPTokenizer`` made offline (written to ``folder`` first if it is not there)."""
    from transformers import CLIPTokenizer

    if not os.path.isfile(os.path.join(folder, "vocab.json")):
        write_clip_tokenizer(folder, pad_token=pad_token)
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


CPU = torch.device("cpu")
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry, low quality"
LONG_PROMPT = " ".join(["a red apple on a wooden table beside a window"] * 22)  # ~220 tokens: needs Long-CLIP


@pytest.fixture(scope="module")
def sd1(demo_root: demo.Demo) -> Iterator[DiffusersAdapter]:
    pipe = demo.load_demo_pipeline(demo_root)
    adapter = DiffusersAdapter(pipe, EncoderResolver(EncoderLibrary([demo_root.encoders])))
    yield adapter
    adapter.apply(Selection())


@pytest.fixture
def adapter(sd1: DiffusersAdapter) -> Iterator[DiffusersAdapter]:
    """The demo adapter, back to Built-in after every test."""
    yield sd1
    sd1.apply(Selection())


def text_encoder_state(pipe: object) -> dict[str, tuple[torch.dtype, torch.Tensor]]:
    """Every parameter and buffer of every text encoder, with its dtype (copied)."""
    out = {}
    for attr in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, attr, None)
        if module is None:
            continue
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            out[f"{attr}.{name}"] = (t.dtype, t.detach().clone())
    return out


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key][0] == b[key][0], f"{key}: dtype {a[key][0]} != {b[key][0]}"
        assert a[key][1].shape == b[key][1].shape, key
        assert torch.equal(a[key][1], b[key][1]), f"{key} changed"


@contextlib.contextmanager
def legacy_text_model(text_encoder: torch.nn.Module) -> Iterator[None]:
    """diffusers' SD1 ``encode_prompt(clip_skip=…)`` still reads ``text_encoder.text_model``, which
    transformers >= 5.6 removed from ``CLIPTextModel``; alias it (outside ``_modules``) for the oracle."""
    added = not hasattr(text_encoder, "text_model")
    if added:
        object.__setattr__(text_encoder, "text_model", text_encoder)
    try:
        yield
    finally:
        if added:
            del text_encoder.__dict__["text_model"]


def diffusers_sd1(pipe: object, prompt: str, negative: str | None, clip_skip: int | None) -> tuple:
    with torch.no_grad(), legacy_text_model(pipe.text_encoder):
        return pipe.encode_prompt(prompt, CPU, 1, True, negative, clip_skip=clip_skip)


# ---------------------------------------------------------------------------------------------
# SD1 (the demo pipeline: a real CLIP-L shape)


def test_family_and_slots(adapter: DiffusersAdapter) -> None:
    assert adapter.family(adapter.pipe) == "sd1"
    assert list(adapter.slots(adapter.pipe)) == ["clip_l"]
    assert adapter.describe(Selection()) == "SD1 · CLIP-L layer 12/12 · native"
    assert adapter.describe(Selection(clip_skip=2)) == "SD1 · CLIP-L layer 11/12"


def test_auto_is_the_pipelines_own_encode_bit_for_bit(adapter: DiffusersAdapter) -> None:
    for prompt, negative in ((PROMPT, NEGATIVE), (LONG_PROMPT, None)):
        ours = adapter.encode(Selection(), prompt, negative)
        theirs = diffusers_sd1(adapter.pipe, prompt, negative, None)
        assert torch.equal(ours["prompt_embeds"], theirs[0])
        assert torch.equal(ours["negative_prompt_embeds"], theirs[1])
        assert ours["prompt_embeds"].dtype == theirs[0].dtype
    # the long prompt was cut where diffusers cuts it, and the adapter says so
    assert any("reads 75 tokens" in w for w in adapter.last_warnings)


@pytest.mark.parametrize("n", [2, 12])
def test_sd1_clip_skip_n_is_diffusers_clip_skip_n_minus_1(adapter: DiffusersAdapter, n: int) -> None:
    ours = adapter.encode(Selection(clip_skip=n), PROMPT, NEGATIVE)
    theirs = diffusers_sd1(adapter.pipe, PROMPT, NEGATIVE, n - 1)
    assert (ours["prompt_embeds"] - theirs[0]).abs().max().item() <= 1e-5
    # negatives use the same N (diffusers encodes them at the last layer whatever clip_skip says)
    negative_at_n = diffusers_sd1(adapter.pipe, NEGATIVE, None, n - 1)[0]
    assert (ours["negative_prompt_embeds"] - negative_at_n).abs().max().item() <= 1e-5
    assert (ours["negative_prompt_embeds"] - theirs[1]).abs().max().item() > 1e-3


def test_clip_skip_stops_the_forward_at_the_chosen_layer(adapter: DiffusersAdapter) -> None:
    blocks = adapter.pipe.text_encoder.encoder.layers
    calls = [0] * len(blocks)
    handles = [
        b.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)) for i, b in enumerate(blocks)
    ]
    try:
        adapter.encode(Selection(clip_skip=4), PROMPT, NEGATIVE)
    finally:
        for h in handles:
            h.remove()
    assert calls == [2] * 9 + [0] * 3  # blocks 10-12 never ran, for the prompt nor the negative


@pytest.mark.parametrize("pipeline", ["sd1", "sdxl", "sd2"])
def test_the_layer_shown_is_the_layer_run(pipeline: str, request: pytest.FixtureRequest, tapped_blocks: list) -> None:
    """The effective-layer line and the truncated forward come from one plan (SD2's 23 layers included)."""
    from te_switch.core.selection import SLOT_LABELS
    from te_switch.hosts.slots import hf_clip_blocks

    host: DiffusersAdapter = request.getfixturevalue(pipeline)
    blocks = {n: hf_clip_blocks(s.module) for n, s in host.slots(host.pipe).items()}
    for n in (1, 2, 3, 12):
        selection = Selection(clip_skip=n)
        plans = host.plans(selection)
        line = host.describe(selection)
        tapped_blocks.clear()
        host.encode(selection, PROMPT, NEGATIVE)
        assert {id(b) for b in tapped_blocks} == {id(blocks[p.tower][p.layer - 1]) for p in plans}, line
        for p in plans:
            assert f"{SLOT_LABELS[p.tower]} layer {p.layer}/{p.layers}" in line


def bad_files(folder: Path, good: dict[str, torch.Tensor]) -> list[tuple[Path, str]]:
    """Encoder files that must be refused: (path, a word the one-line error must contain)."""
    nan = dict(good)
    nan["text_model.encoder.layers.11.mlp.fc2.weight"] = nan["text_model.encoder.layers.11.mlp.fc2.weight"].clone()
    nan["text_model.encoder.layers.11.mlp.fc2.weight"][3, 5] = float("nan")
    save_file(nan, str(folder / "nan.safetensors"))
    wide = {k: v for k, v in good.items() if ".mlp." not in k}  # CLIP-L with the real 3072 MLP: wrong shapes here
    for i in range(12):
        wide[f"text_model.encoder.layers.{i}.mlp.fc1.weight"] = torch.zeros(3072, 768, dtype=torch.float16)
        wide[f"text_model.encoder.layers.{i}.mlp.fc1.bias"] = torch.zeros(3072, dtype=torch.float16)
        wide[f"text_model.encoder.layers.{i}.mlp.fc2.weight"] = torch.zeros(768, 3072, dtype=torch.float16)
        wide[f"text_model.encoder.layers.{i}.mlp.fc2.bias"] = torch.zeros(768, dtype=torch.float16)
    save_file(wide, str(folder / "wide.safetensors"))
    (folder / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    return [
        (folder / "nan.safetensors", "NaN"),
        (folder / "wide.safetensors", "3072"),
        (folder / "garbage.safetensors", "garbage"),
    ]


def test_swap_failed_swap_and_restore_are_bit_identical(adapter: DiffusersAdapter, tmp_path: Path) -> None:
    pipe = adapter.pipe
    original = text_encoder_state(pipe)
    auto = adapter.encode(Selection(), PROMPT, NEGATIVE)
    alt = Selection(clip_skip=2, slots={"clip_l": SlotChoice("clip-l-alt.safetensors")})

    result = generate(adapter, alt, PROMPT, NEGATIVE, seed=5, steps=1, size=64)
    assert result.image.size == (64, 64)
    lines = result.infotext.split("\n")
    assert lines[:2] == [PROMPT, f"Negative prompt: {NEGATIVE}"]
    for words in ("Clip skip: 2", "Seed: 5", "Size: 64x64", "Steps: 1"):
        assert words in lines[2]
    assert re.search(r"TE CLIP-L: clip-l-alt\.safetensors \[[0-9a-f]{10}\]", lines[2])
    assert set(result.timings) == {"swap", "encode", "generate"}
    assert all(v >= 0 for v in result.timings.values())
    good = load_file(demo_root_path(adapter) / "clip-l-alt.safetensors")
    live = pipe.text_encoder.encoder.layers[3].mlp.fc1.weight
    assert torch.equal(live, good["text_model.encoder.layers.3.mlp.fc1.weight"].float())
    assert not torch.equal(adapter.encode(alt, PROMPT, NEGATIVE)["prompt_embeds"], auto["prompt_embeds"])

    # a refused file leaves the swapped state exactly as it was, and says why in one line
    swapped = text_encoder_state(pipe)
    for path, words in bad_files(tmp_path, good):
        with pytest.raises(TESwitchError) as info:
            adapter.apply(Selection(slots={"clip_l": SlotChoice(str(path))}))
        assert "\n" not in str(info.value)
        assert words in str(info.value)
        assert_same_state(swapped, text_encoder_state(pipe))

    # Built-in at another precision, then Built-in: the checkpoint's own tensors and dtypes, bit for bit
    fp16 = generate(adapter, Selection(slots={"clip_l": SlotChoice(None, "fp16")}), PROMPT, seed=5, steps=1, size=64)
    assert pipe.text_encoder.dtype == torch.float16
    assert "TE CLIP-L precision: fp16" in fp16.infotext
    assert "TE CLIP-L:" not in fp16.infotext
    adapter.apply(Selection())
    assert_same_state(original, text_encoder_state(pipe))
    assert torch.equal(adapter.encode(Selection(), PROMPT, NEGATIVE)["prompt_embeds"], auto["prompt_embeds"])


def demo_root_path(adapter: DiffusersAdapter) -> Path:
    return Path(adapter.resolver.library.folders[0])  # type: ignore[attr-defined]


def test_long_clip_one_chunk_matches_a_transformers_model_loaded_from_the_file(adapter: DiffusersAdapter) -> None:
    path = demo_root_path(adapter) / "long-clip-l.safetensors"
    reference = long_clip_reference(path)
    selection = Selection(clip_skip=3, slots={"clip_l": SlotChoice("long-clip-l.safetensors")})
    ours = adapter.encode(selection, LONG_PROMPT, NEGATIVE)
    tokenizer = adapter.pipe.tokenizer
    assert tokenizer.model_max_length == 248
    assert adapter.token_budget(LONG_PROMPT)[1] == 246
    for text, key in ((LONG_PROMPT, "prompt_embeds"), (NEGATIVE, "negative_prompt_embeds")):
        ids = tokenizer(text, padding="max_length", max_length=248, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out = reference(ids, output_hidden_states=True)
            expected = reference.final_layer_norm(out.hidden_states[-3])
        assert ours[key].shape == (1, 248, 768)
        assert (ours[key] - expected).abs().max().item() <= 1e-5
    assert adapter.last_warnings == []  # ~220 tokens fit one 246-token chunk
    count, chunk = adapter.token_budget(LONG_PROMPT + " " + LONG_PROMPT)
    assert (chunk, count > 246) == (246, True)

    adapter.apply(Selection())
    assert tokenizer.model_max_length == 77
    assert adapter.pipe.text_encoder.embeddings.position_embedding.weight.shape[0] == 77


def long_clip_reference(path: Path) -> CLIPTextModel:
    """A 248-position CLIPTextModel from an original-layout Long-CLIP file, converted here by hand."""
    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    hf: dict[str, torch.Tensor] = {
        "embeddings.token_embedding.weight": sd["token_embedding.weight"],
        # Long-CLIP adds pe * mask1 + pe_res * mask2: rows < 20 from pe, the rest from pe_res
        "embeddings.position_embedding.weight": torch.cat(
            [sd["positional_embedding"][:20], sd["positional_embedding_res"][20:]]
        ),
        "final_layer_norm.weight": sd["ln_final.weight"],
        "final_layer_norm.bias": sd["ln_final.bias"],
    }
    for key, value in sd.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)", key)
        if not m:
            continue
        head, rest = f"encoder.layers.{m.group(1)}.", m.group(2)
        if rest.startswith("attn.in_proj_"):
            kind = rest.rsplit("_", 1)[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3), strict=True):
                hf[f"{head}self_attn.{name}.{kind}"] = part
            continue
        renames = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip
        module, param = rest.rsplit(".", 1)
        hf[f"{head}{renames[module]}.{param}"] = value
    return hf_clip(CLIPTextConfig(**{**demo.CLIP_L_CONFIG, "max_position_embeddings": 248}), hf)


def hf_clip(config: CLIPTextConfig, state: dict[str, torch.Tensor]) -> CLIPTextModel:
    """A ``CLIPTextModel`` holding exactly ``state`` (built on the meta device: no random init to pay for)."""
    with torch.device("meta"):
        model = CLIPTextModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert not unexpected
    assert set(missing) <= {"embeddings.position_ids"}
    model.embeddings.position_ids = torch.arange(config.max_position_embeddings).expand((1, -1))
    return model.eval()


def test_fp32_slot_computes_in_fp32_and_casts_to_the_unet_dtype(demo_root: demo.Demo) -> None:
    pipe = load_pipeline(demo_root.pipeline, dtype=torch.bfloat16, device="cpu")
    adapter = DiffusersAdapter(pipe, EncoderResolver())
    before = text_encoder_state(pipe)
    reference = hf_clip(pipe.text_encoder.config, {k: v.float() for k, v in pipe.text_encoder.state_dict().items()})
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference.final_layer_norm(reference(ids, output_hidden_states=True).hidden_states[-2])
        native = adapter.encode(Selection(clip_skip=2), PROMPT, NEGATIVE)["prompt_embeds"]
    selection = Selection(clip_skip=2, slots={"clip_l": SlotChoice(None, "fp32")})
    with torch.autocast("cpu", dtype=torch.bfloat16):  # must not reach the fp32 encode
        ours = adapter.encode(selection, PROMPT, NEGATIVE)["prompt_embeds"]
    assert pipe.text_encoder.dtype == torch.float32
    assert ours.dtype == pipe.unet.dtype == torch.bfloat16
    assert torch.equal(ours, expected.to(torch.bfloat16))
    assert not torch.equal(native, ours)  # bf16 compute really is different
    adapter.apply(Selection())
    assert_same_state(before, text_encoder_state(pipe))


# ---------------------------------------------------------------------------------------------
# SDXL: two towers with their real depths (12 and 32) and small widths


def seeded(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fan-in scaled random weights. transformers' default init (std 0.02) drives tiny towers into
    subnormal floats, which CPUs compute ~100x slower; these weights keep the activations normal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim >= 2:
                p.copy_(noise * (0.02 if "embed" in name or "shared" in name else p.shape[1] ** -0.5))
            else:
                p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.02 * noise)
    return model.eval()


def clip_config(layers: int, act: str, width: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=37, num_hidden_layers=layers, num_attention_heads=4,
        hidden_act=act, projection_dim=width, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip


def tiny_unet(cross: int, *, sdxl: bool) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    extra = {}
    if sdxl:
        extra = {"addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                 "projection_class_embeddings_input_dim": 6 * 8 + 32}  # fmt: skip
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=cross, norm_num_groups=4, **extra,
    )  # fmt: skip


def tiny_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> DiffusersAdapter:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    folder = tmp_path_factory.mktemp("sdxl_tokenizers")
    torch.manual_seed(11)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=seeded(CLIPTextModel(clip_config(12, "quick_gelu")), 1),
        text_encoder_2=seeded(CLIPTextModelWithProjection(clip_config(32, "gelu")), 2),
        tokenizer=clip_tokenizer(str(folder / "l")),
        tokenizer_2=clip_tokenizer(str(folder / "g"), pad_token="!"),
        unet=tiny_unet(64, sdxl=True),
        scheduler=EulerDiscreteScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return DiffusersAdapter(pipe, EncoderResolver())


SDXL_KEYS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


def test_sdxl_auto_is_the_pipelines_own_encode_bit_for_bit(sdxl: DiffusersAdapter) -> None:
    assert sdxl.family(sdxl.pipe) == "sdxl"
    for negative in (None, NEGATIVE):  # None: diffusers' zeroed negative (force_zeros_for_empty_prompt)
        with torch.no_grad():
            theirs = sdxl.pipe.encode_prompt(PROMPT, device=CPU, negative_prompt=negative)
        ours = sdxl.encode(Selection(), PROMPT, negative)
        for key, value in zip(SDXL_KEYS, theirs, strict=True):
            assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("n", [1, 3, 12])
def test_sdxl_clip_skip_indexes_hidden_states_without_layer_norm(sdxl: DiffusersAdapter, n: int) -> None:
    pipe = sdxl.pipe
    ours = sdxl.encode(Selection(clip_skip=n), PROMPT, NEGATIVE)
    for text, key, pooled_key in ((PROMPT, "prompt_embeds", "pooled_prompt_embeds"),
                                  (NEGATIVE, "negative_prompt_embeds", "negative_pooled_prompt_embeds")):  # fmt: skip
        with torch.no_grad():
            ids_l = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            ids_g = pipe.tokenizer_2(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            out_l = pipe.text_encoder(ids_l.input_ids, output_hidden_states=True)
            out_g = pipe.text_encoder_2(ids_g.input_ids, output_hidden_states=True)
        expected = torch.cat([out_l.hidden_states[-n], out_g.hidden_states[-n]], dim=-1)
        assert (ours[key] - expected).abs().max().item() <= 1e-5
        assert torch.equal(ours[pooled_key], out_g.text_embeds)  # pooled: final layer, whatever N
    if n >= 3:  # diffusers' own SDXL clip_skip k means hidden_states[-(k + 2)] (positives only)
        with torch.no_grad():
            theirs = pipe.encode_prompt(PROMPT, device=CPU, negative_prompt=NEGATIVE, clip_skip=n - 2)
        assert (ours["prompt_embeds"] - theirs[0]).abs().max().item() <= 1e-5
    if n == 1:
        assert sdxl.describe(Selection(clip_skip=1)) == "SDXL · CLIP-L layer 12/12 · CLIP-G layer 32/32"


def test_sdxl_scope_and_generate(sdxl: DiffusersAdapter) -> None:
    only_g = sdxl.encode(Selection(clip_skip=5, scope="clip_g"), PROMPT, NEGATIVE)["prompt_embeds"]
    native = sdxl.encode(Selection(), PROMPT, NEGATIVE)["prompt_embeds"]
    assert torch.equal(only_g[..., :32], native[..., :32])  # CLIP-L stays at its native layer
    assert not torch.equal(only_g[..., 32:], native[..., 32:])
    result = generate(sdxl, Selection(clip_skip=3), PROMPT, NEGATIVE, seed=1, steps=1, size=64)
    assert result.image.size == (64, 64)
    assert "Clip skip: 3" in result.infotext


def test_sdxl_refiner_family() -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    torch.manual_seed(12)
    unet = tiny_unet(32, sdxl=False)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=tiny_vae(), text_encoder=None, text_encoder_2=seeded(CLIPTextModelWithProjection(clip_config(32, "gelu")), 3),
        tokenizer=None, tokenizer_2=None, unet=unet, scheduler=EulerDiscreteScheduler(), requires_aesthetics_score=True,
    )  # fmt: skip
    assert pipeline_family(pipe) == "sdxl-refiner"
    assert list(DiffusersAdapter(pipe, EncoderResolver()).slots(pipe)) == ["clip_g"]


# ---------------------------------------------------------------------------------------------
# SD2: diffusers keeps 23 of OpenCLIP-H's 24 layers


@pytest.fixture(scope="module")
def sd2(tmp_path_factory: pytest.TempPathFactory) -> DiffusersAdapter:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("sd2_tokenizer")
    torch.manual_seed(13)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=seeded(CLIPTextModel(clip_config(23, "gelu")), 4),
        tokenizer=clip_tokenizer(str(folder), pad_token="!"), unet=tiny_unet(32, sdxl=False),
        scheduler=EulerDiscreteScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    return DiffusersAdapter(pipe, EncoderResolver())


def test_sd2_counts_clip_skip_in_the_original_24_layers(sd2: DiffusersAdapter, tmp_path: Path) -> None:
    pipe = sd2.pipe
    assert sd2.family(pipe) == "sd2"
    theirs = diffusers_sd1(pipe, PROMPT, NEGATIVE, None)
    auto = sd2.encode(Selection(), PROMPT, NEGATIVE)
    assert torch.equal(auto["prompt_embeds"], theirs[0])
    assert torch.equal(auto["negative_prompt_embeds"], theirs[1])
    # N=2 is SD2's native layer: diffusers' last layer (23) + final LN; N=1 (layer 24) is not there
    assert torch.equal(sd2.encode(Selection(clip_skip=2), PROMPT, NEGATIVE)["prompt_embeds"], theirs[0])
    assert torch.equal(sd2.encode(Selection(clip_skip=1), PROMPT, NEGATIVE)["prompt_embeds"], theirs[0])
    assert "layer 23 used" in sd2.describe(Selection(clip_skip=1))
    assert sd2.describe(Selection()) == "SD2 · CLIP-H layer 23/24 · native"

    # a 24-layer file goes in without its last block, and N still counts in 24 layers
    torch.manual_seed(14)
    full = seeded(CLIPTextModel(clip_config(24, "gelu")), 5)
    path = tmp_path / "clip-h-24.safetensors"
    save_file({f"text_model.{k}": v for k, v in full.state_dict().items() if "position_ids" not in k}, str(path))
    tower = inspect_path(str(path))[0]
    tower.kind = "clip-h"  # detection wants the real width (1024); this file is narrow to stay small
    source = EncoderSource(str(path), tower, "clip-h-24.safetensors")
    selection = Selection(clip_skip=4, slots={"clip_h": SlotChoice("clip-h-24.safetensors")})
    resolver = sd2.resolver
    sd2.resolver = lambda slot, name: source
    try:
        ours = sd2.encode(selection, PROMPT, NEGATIVE)["prompt_embeds"]
        assert len(pipe.text_encoder.encoder.layers) == 23
        layer = pipe.text_encoder.encoder.layers[22].mlp.fc2.weight
        assert torch.equal(layer, full.encoder.layers[22].mlp.fc2.weight)
    finally:
        sd2.apply(Selection())
        sd2.resolver = resolver
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = full.final_layer_norm(full(ids, output_hidden_states=True).hidden_states[-4])
    assert (ours - expected).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------
# SD3 and Flux: CLIP towers beside a T5 (tiny T5 with a tiny Unigram tokenizer made here)


def t5_parts() -> tuple[torch.nn.Module, object]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["a", "lighthouse", "on", "cliff", "at", "dusk", "oil", "painting", "blurry", "low", "quality"]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0 - i / 100) for i, w in enumerate(words)]
    pieces += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz,\u2581"]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    config = T5Config(
        vocab_size=len(pieces), d_model=96, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    )  # fmt: skip
    return seeded(T5EncoderModel(config), 9), fast


def flow_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip


def test_sd3_clip_skip_on_both_towers_and_t5_untouched(tmp_path: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(15)
    t5, t5_tokenizer = t5_parts()  # d_model 96: wider than the two CLIPs together, as in SD3
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=16, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=96, pooled_projection_dim=64, out_channels=4,
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=flow_vae(),
        text_encoder=seeded(CLIPTextModelWithProjection(clip_config(12, "quick_gelu")), 6),
        tokenizer=clip_tokenizer(str(tmp_path / "l")),
        text_encoder_2=seeded(CLIPTextModelWithProjection(clip_config(32, "gelu")), 7),
        tokenizer_2=clip_tokenizer(str(tmp_path / "g"), pad_token="!"),
        text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )  # fmt: skip
    adapter = DiffusersAdapter(pipe, EncoderResolver())
    assert (adapter.family(pipe), list(adapter.slots(pipe))) == ("sd3", ["clip_l", "clip_g", "t5xxl"])
    with torch.no_grad():
        theirs = pipe.encode_prompt(PROMPT, None, None, device=CPU, negative_prompt=NEGATIVE)
    auto = adapter.encode(Selection(), PROMPT, NEGATIVE)
    for key, value in zip(SDXL_KEYS, theirs, strict=True):
        assert torch.equal(auto[key], value), key

    ours = adapter.encode(Selection(clip_skip=5), PROMPT, NEGATIVE)
    for text, key, pooled_key in ((PROMPT, "prompt_embeds", "pooled_prompt_embeds"),
                                  (NEGATIVE, "negative_prompt_embeds", "negative_pooled_prompt_embeds")):  # fmt: skip
        with torch.no_grad():
            outs = [
                encoder(tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
                        .input_ids, output_hidden_states=True)
                for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))
            ]  # fmt: skip
        clip = torch.cat([outs[0].hidden_states[-5], outs[1].hidden_states[-5]], dim=-1)
        assert (ours[key][:, :77, :64] - clip).abs().max().item() <= 1e-5  # CLIP rows, zero-padded to T5's width
        assert not ours[key][:, :77, 64:].any()
        assert torch.equal(ours[key][:, 77:], auto[key][:, 77:])  # T5 rows: never skipped
        assert torch.equal(ours[pooled_key], torch.cat([outs[0].text_embeds, outs[1].text_embeds], dim=-1))


def test_flux_clip_skip_has_no_effect(tmp_path: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(16)
    t5, t5_tokenizer = t5_parts()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=flow_vae(),
        text_encoder=seeded(CLIPTextModel(clip_config(12, "quick_gelu")), 8), tokenizer=clip_tokenizer(str(tmp_path)),
        text_encoder_2=t5, tokenizer_2=t5_tokenizer,
        transformer=FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=96, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        ),
    )  # fmt: skip
    adapter = DiffusersAdapter(pipe, EncoderResolver())
    assert adapter.describe(Selection(clip_skip=3)) == "Flux uses only CLIP-L's pooled output: clip skip has no effect"
    with torch.no_grad():
        theirs = pipe.encode_prompt(PROMPT, None, device=CPU, max_sequence_length=64)
    for selection in (Selection(), Selection(clip_skip=3)):
        ours = adapter.encode(selection, PROMPT, max_sequence_length=64)
        assert torch.equal(ours["prompt_embeds"], theirs[0])
        assert torch.equal(ours["pooled_prompt_embeds"], theirs[1])


# ---------------------------------------------------------------------------------------------
# loading: nothing is downloaded, and whatever is missing is named


def test_load_pipeline_says_what_to_provide(tmp_path: Path, demo_root: demo.Demo) -> None:
    with pytest.raises(TESwitchError, match=r"no model_index.json.*--config DIR"):
        load_pipeline(str(tmp_path), device="cpu")
    import filemakers as fm

    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(TESwitchError, match=r"not a checkpoint \(empty.safetensors: empty file"):
        load_pipeline(str(empty), device="cpu")
    checkpoint = fm.write_sparse_safetensors(  # an SDXL-style bundle: not SD1, so it needs --config
        tmp_path / "model.safetensors", fm.prefixed(fm.hf_clip_spec(768, 12), "conditioner.embedders.0.transformer.")
    )
    with pytest.raises(TESwitchError, match=r"single-file checkpoint other than SD1.x needs --config DIR"):
        load_pipeline(str(checkpoint), device="cpu")
    no_tokenizer = tmp_path / "copy"
    os.makedirs(no_tokenizer)
    for name in ("model_index.json",):
        (no_tokenizer / name).write_bytes((Path(demo_root.pipeline) / name).read_bytes())
    for sub in ("unet", "vae", "scheduler", "text_encoder"):
        os.symlink(Path(demo_root.pipeline) / sub, no_tokenizer / sub)
    with pytest.raises(TESwitchError, match=r"lacks tokenizer/"):
        load_pipeline(str(no_tokenizer), device="cpu")
    with pytest.raises(TESwitchError, match=r"lacks tokenizer/"):
        load_pipeline(str(checkpoint), config=str(no_tokenizer), device="cpu")
    with pytest.raises(TESwitchError, match=r"no such file"):
        load_pipeline(str(tmp_path / "missing.safetensors"), device="cpu")


def test_sd1_single_files_get_the_built_in_config(tmp_path: Path) -> None:
    import filemakers as fm

    from te_switch.standalone.pipeline import SD15_CONFIG, _check_model_folder, builtin_config, single_file_architecture

    clip_l = fm.hf_clip_spec(768, 12)
    sd1 = fm.write_sparse_safetensors(
        tmp_path / "sd1.safetensors", fm.prefixed(clip_l, "cond_stage_model.transformer.")
    )
    sdxl = fm.write_sparse_safetensors(
        tmp_path / "sdxl.safetensors",
        {**fm.prefixed(clip_l, "conditioner.embedders.0.transformer."),
         **fm.prefixed(fm.openclip_spec(1280, 32, proj=1280), "conditioner.embedders.1.model.")},
    )  # fmt: skip
    assert single_file_architecture(str(sd1)) == "sd15"
    assert single_file_architecture(str(sdxl)) is None
    folder = builtin_config("sd15", root=str(tmp_path / "cache"))
    assert folder == builtin_config("sd15", root=str(tmp_path / "cache"))  # written once, then reused
    assert _check_model_folder(folder, what=folder) == "StableDiffusionPipeline"
    config = CLIPTextConfig.from_pretrained(os.path.join(folder, "text_encoder"))
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (768, 12, 3072)
    assert set(SD15_CONFIG) <= {str(p.relative_to(folder)) for p in Path(folder).rglob("*.json")}
    with pytest.raises(TESwitchError, match=r"other than SD1\.x needs --config"):
        load_pipeline(str(sdxl), device="cpu")
