"""A1111 1.10 SD3 with its T5 on (``sd3_enable_t5``), on the fake A1111 (tests/fakes/a1111).

The fake SD3 is built the way A1111 builds it: a checkpoint without T5, the T5 read by
``SD3Cond.before_load_weights`` from ``models/CLIP/t5xxl_fp16.safetensors`` (strict=False, key
``encoder.embed_tokens.weight``), then ``half()`` or, with ``--no-half``, ``float()``. A1111's own T5
casts its embeddings to fp32 and computes in fp32 whatever its weights hold.

The reference for every T5 file is **stock A1111 loading that file itself** as its
``t5xxl_fp16.safetensors`` (a fresh model, no TE Switch): a swap at precision Auto must give the same
weights and the same conditioning, bit for bit. A1111 reads only safetensors, and only the
``encoder.embed_tokens.weight`` key (a file with just ``shared.weight`` leaves its table unloaded), so
the file it loads holds the values the swapped file stands for: the same tensors plus that key; GGUF
blocks dequantised by gguf-py; scaled fp8 as ``fp8 · scale``; shards merged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import filemakers as fm
import pytest
import refmodels as rm
import synth_gguf
import torch
from fakes.a1111.assets import Checkpoints, Env
from fakes.harness import fake_webui
from safetensors.torch import save_file
from test_a1111_adapter import PROMPT, assert_identical, assert_state, encode, state_of, with_slot

from te_switch.core.errors import TESwitchError
from te_switch.core.selection import Selection, SlotChoice

pytestmark = pytest.mark.usefixtures("one_thread")

EMBED = "encoder.embed_tokens.weight"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("a1111-sd3-checkpoints"))


@pytest.fixture(params=["no-half", "half"])
def env(request: pytest.FixtureRequest, checkpoints: Checkpoints, tmp_path: Path) -> Iterator[Env]:
    """A fake A1111 on the CPU: ``--no-half`` (fp32 weights, this rig's setting) or half (fp16 weights)."""
    with fake_webui("a1111"):
        from modules import devices, shared, shared_options  # noqa: F401

        half = request.param == "half"
        shared.cmd_opts.no_half = not half
        devices.dtype = devices.dtype_unet = devices.dtype_inference = torch.float16 if half else torch.float32
        saved = shared.models_path
        shared.models_path = str(tmp_path / "models")
        os.makedirs(Path(shared.models_path) / "CLIP")
        try:
            yield Env(checkpoints, tmp_path)
        finally:
            shared.models_path = saved


# ---------------------------------------------------------------------------------------------
# T5 files of every format, and what stock A1111 would load for each


def t5_master(seed: int) -> dict[str, torch.Tensor]:
    """Canonical fp32 weights (``shared.weight``, no ``embed_tokens``) in the fake SD3's T5 shape."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=32128, d_model=192, d_kv=48, d_ff=128, num_layers=3, num_heads=4,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    return rm.t5_canonical_sd(rm.randomize_(T5EncoderModel(config), seed).eval())


def with_embed_tokens(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**values, EMBED: values["shared.weight"].clone()}


def write_format(folder: Path, fmt: str, master: dict[str, torch.Tensor]) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the file users would pick, the tensors stock A1111 would need to load the same values)."""
    folder.mkdir(parents=True, exist_ok=True)
    casts = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
             "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}  # fmt: skip
    if fmt in casts:
        stored = {k: v.to(casts[fmt]) for k, v in master.items()}
        path = folder / f"t5-{fmt}.safetensors"
        save_file(stored, str(path))
        return path, with_embed_tokens(stored)
    if fmt == "fp8_scaled":
        stored, dense = fm.scaled_fp8_state({k: v.to(torch.float16) for k, v in master.items()})
        path = folder / "t5-fp8_scaled.safetensors"
        save_file(stored, str(path))
        return path, with_embed_tokens(dense)
    if fmt == "gguf_q8_0":
        names = synth_gguf.hf_t5_to_llama_names(dict(zip(master, master, strict=True)))
        path = folder / "t5-Q8_0.gguf"
        held = synth_gguf.write_gguf(path, synth_gguf.hf_t5_to_llama_names(master), "Q8_0")
        return path, with_embed_tokens({names[llama]: value for llama, value in held.items()})
    if fmt == "sharded_bf16":
        stored = {k: v.to(torch.bfloat16) for k, v in master.items()}
        keys = sorted(stored)
        half = len(keys) // 2
        index = fm.write_sharded(folder / "t5-sharded", [{k: stored[k] for k in keys[:half]},
                                                         {k: stored[k] for k in keys[half:]}])  # fmt: skip
        return index, with_embed_tokens(stored)
    raise AssertionError(fmt)


FORMATS = ["fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2", "fp8_scaled", "gguf_q8_0", "sharded_bf16"]


def host_t5(env: Env, tensors: dict[str, torch.Tensor]) -> Path:
    """Make ``tensors`` the file A1111 reads as SD3's T5 (``models/CLIP/t5xxl_fp16.safetensors``)."""
    from modules import shared

    path = Path(shared.models_path) / "CLIP" / "t5xxl_fp16.safetensors"
    path.unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def load_sd3(env: Env) -> Any:
    """Stock A1111 loading the SD3 checkpoint (no T5 inside) with Enable T5 on."""
    from modules import sd_models, shared

    info = env.info("sd3")  # written (once) with Enable T5 off: no T5 inside
    shared.opts.sd3_enable_t5 = True
    return sd_models.load_model(info)


def t5_of(model: Any) -> torch.nn.Module:
    return model.text_encoders.t5xxl.transformer


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def t5_part(cond: dict[str, torch.Tensor]) -> torch.Tensor:
    return cond["crossattn"][:, 77:]


# ---------------------------------------------------------------------------------------------
# Auto = stock A1111 loading the same file


def test_t5_slot_and_layer_line(env: Env) -> None:
    host_t5(env, with_embed_tokens(t5_master(40)))
    model = load_sd3(env)
    adapter = env.adapter()
    assert list(adapter.slots(model)) == ["clip_l", "clip_g", "t5xxl"]
    line = adapter.describe(Selection())
    assert line.startswith("SD3 · CLIP-L layer 11/12 · CLIP-G layer 31/32")
    assert "T5-XXL: every layer" in line
    assert "T5-XXL: every layer" in adapter.describe(Selection(clip_skip=3))
    assert "T5 off" not in line


@pytest.mark.parametrize("fmt", FORMATS)
def test_t5_swap_at_auto_is_stock_a1111_loading_that_file(env: Env, fmt: str) -> None:
    builtin = with_embed_tokens({k: v.to(torch.float16) for k, v in t5_master(41).items()})
    path, host_loads = write_format(env.folder / "encoders", fmt, t5_master(42))

    host_t5(env, host_loads)  # stock A1111 with that file as its T5
    stock_model = load_sd3(env)
    stock = encode(stock_model, [PROMPT])
    stock_weights = {k: v.clone() for k, v in t5_of(stock_model).state_dict().items()}

    host_t5(env, builtin)  # the T5 A1111 ships with; TE Switch swaps the file in
    model = load_sd3(env)
    adapter = env.adapter()
    before, own = state_of(model), encode(model, [PROMPT])
    label = env.source(path, "t5-xxl")
    assert adapter.apply(with_slot(Selection(), t5xxl=SlotChoice(label))) == ["t5xxl"]
    swapped = t5_of(model).state_dict()
    for key, value in stock_weights.items():
        assert swapped[key].dtype == value.dtype, key
        assert torch.equal(swapped[key], value), key  # dense in the host's dtype, as A1111 holds it
    assert_identical(encode(model, [PROMPT]), stock)
    assert not torch.equal(t5_part(stock), t5_part(own))

    assert adapter.apply(Selection()) == ["t5xxl"]
    assert_state(before, model)  # Built-in, bit for bit, re-read from models/CLIP/t5xxl_fp16.safetensors
    assert adapter.engine.kept_bytes(adapter.slots(model)["t5xxl"]) == 0
    assert_identical(encode(model, [PROMPT]), own)


def test_a_file_with_only_shared_weight_loads_its_table(env: Env) -> None:
    """Every T5 file names the table ``shared.weight``; A1111's own load would skip it (strict=False)."""
    master = t5_master(43)
    host_t5(env, with_embed_tokens(master))
    stock = encode(load_sd3(env), [PROMPT])
    host_t5(env, with_embed_tokens(t5_master(44)))
    model = load_sd3(env)
    adapter = env.adapter()
    path = env.folder / "t5-shared-only.safetensors"
    save_file(master, str(path))
    adapter.apply(with_slot(Selection(), t5xxl=SlotChoice(env.source(path, "t5-xxl"))))
    assert_identical(encode(model, [PROMPT]), stock)


# ---------------------------------------------------------------------------------------------
# precision


def block_input_dtypes(model: Any) -> tuple[list[torch.dtype], Callable[[], None]]:
    seen: list[torch.dtype] = []
    handle = t5_of(model).encoder.block[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    return seen, handle.remove


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_explicit_precision_computes_t5_in_that_dtype(env: Env, precision: str) -> None:
    from modules import devices

    master = t5_master(45)
    host_t5(env, with_embed_tokens({k: v.to(torch.float16) for k, v in master.items()}))
    model = load_sd3(env)
    adapter = env.adapter()
    stock = encode(model, [PROMPT])
    seen, remove = block_input_dtypes(model)
    encode(model, [PROMPT])
    assert seen == [torch.float32]  # Auto: A1111's own T5 computes in fp32 whatever its weights hold

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    adapter.apply(with_slot(Selection(), t5xxl=SlotChoice(None, precision)))
    assert {p.dtype for p in t5_of(model).parameters()} == {dtype}
    seen.clear()
    ours = encode(model, [PROMPT])
    remove()
    assert seen == [dtype]
    assert ours["crossattn"].dtype == stock["crossattn"].dtype == torch.float32  # what SDClipModel returns
    assert torch.equal(ours["crossattn"][:, :77], stock["crossattn"][:, :77])  # CLIP-L/G untouched
    # against transformers' T5 on the same (fp16-stored) weights, computed in fp32
    reference = t5_reference({k: v.to(torch.float16).float() for k, v in master.items()})
    tokens, _ = model.text_encoders.model_t5.tokenize_line(PROMPT, target_token_count=77)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([tokens])).last_hidden_state[0]
    err = (t5_part(ours)[0].double() - expected.double()).abs().max().item()
    scale = expected.abs().max().item()
    tolerance = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 5e-2}[precision]
    assert err <= tolerance * scale, f"{precision}: worst {err:.3g} of {scale:.3g}"
    if precision == "fp32" and devices.dtype == torch.float32:
        assert torch.equal(ours["crossattn"], stock["crossattn"])  # fp32 is what --no-half computes anyway
    adapter.apply(Selection())
    assert_identical(encode(model, [PROMPT]), stock)


def t5_reference(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=32128, d_model=192, d_kv=48, d_ff=128, num_layers=3, num_heads=4,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False)  # fmt: skip
    model = T5EncoderModel(config).eval()
    model.load_state_dict({**sd, EMBED: sd["shared.weight"]})
    return model


# ---------------------------------------------------------------------------------------------
# CLIP-L / CLIP-G with T5 on, restore of all three, bad files


def test_clip_swaps_with_t5_on_and_restore_after_each(env: Env) -> None:
    host_t5(env, with_embed_tokens({k: v.to(torch.float16) for k, v in t5_master(46).items()}))
    model = load_sd3(env)
    adapter = env.adapter()
    before, stock = state_of(model), encode(model, [PROMPT])
    l_label, _ = env.clip_l_file(47)
    g_label, _ = env.open_clip_file("ViT-bigG-14", 48, layout="hf")
    t5_path, _ = write_format(env.folder / "encoders", "fp8_e4m3fn", t5_master(49))
    t5_label = env.source(t5_path, "t5-xxl")
    for choices in (
        {"t5xxl": SlotChoice(t5_label)},
        {"clip_l": SlotChoice(l_label)},
        {"clip_l": SlotChoice(l_label), "t5xxl": SlotChoice(t5_label)},
        {"clip_l": SlotChoice(l_label), "clip_g": SlotChoice(g_label), "t5xxl": SlotChoice(t5_label, "fp32")},
    ):
        assert sorted(adapter.apply(with_slot(Selection(), **choices))) == sorted(choices)
        # no copy kept: Built-in comes from the files (CLIP-L's projection is the identity A1111 builds)
        assert all(adapter.engine.kept_bytes(slot) == 0 for slot in adapter.slots(model).values())
        cond = encode(model, [PROMPT])
        t5_changed = not torch.equal(t5_part(cond), t5_part(stock))
        assert t5_changed == ("t5xxl" in choices)
        assert torch.equal(cond["crossattn"][:, :77], stock["crossattn"][:, :77]) == ("clip_l" not in choices)
        adapter.apply(Selection())
        assert_state(before, model)
        assert_identical(encode(model, [PROMPT]), stock)


def test_bad_t5_files_change_nothing(env: Env) -> None:
    host_t5(env, with_embed_tokens({k: v.to(torch.float16) for k, v in t5_master(50).items()}))
    model = load_sd3(env)
    adapter = env.adapter()
    before, stock = state_of(model), encode(model, [PROMPT])
    l_label, _ = env.clip_l_file(51)
    folder = env.folder / "bad"
    truncated, _ = write_format(folder, "gguf_q8_0", t5_master(52))
    truncated_label = env.source(truncated, "t5-xxl")  # listed while whole, cut short before the swap
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    nan = with_embed_tokens(t5_master(53))
    nan["encoder.block.1.layer.1.DenseReluDense.wo.weight"][2, 3] = float("nan")
    nan_path = folder / "t5-nan.safetensors"
    save_file(nan, str(nan_path))
    for label, words in ((truncated_label, truncated.name), (env.source(nan_path, "t5-xxl"), "NaN")):
        # the good CLIP-L file is not applied either: the swap is atomic across slots
        with pytest.raises(TESwitchError) as err:
            adapter.apply(with_slot(Selection(), clip_l=SlotChoice(l_label), t5xxl=SlotChoice(label)))
        message = str(err.value)
        assert "\n" not in message, message
        assert words in message, message
        assert_state(before, model)
        assert adapter.engine.epoch == 0
    with pytest.raises(TESwitchError, match="cannot go into the T5-XXL slot"):
        adapter.apply(with_slot(Selection(), t5xxl=SlotChoice(l_label)))  # a CLIP-L file in the T5 slot
    assert_state(before, model)
    assert_identical(encode(model, [PROMPT]), stock)
