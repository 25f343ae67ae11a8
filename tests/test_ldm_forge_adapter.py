"""The reForge / Forge Classic adapter against fakes of both (tests/fakes/{reforge,forge_classic,ldm_forge}
over the A1111 fakes: these Forges keep A1111's text path).

Models are built the way both hosts build them (``forge_loader.load_model_for_a1111``: A1111 config with
``no_clip``, ComfyUI ``CLIP`` from the checkpoint with fp16 weights and fp32 embeddings, A1111 wrappers
wired to its HF modules, ``model_loaded_callback``, empty-prompt cond) from the random checkpoints the
A1111 tests use (real depths, small widths). References are independent: transformers models holding
the same weights, and a second model loaded from a checkpoint with the encoder file baked in offline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fakes.harness import fake_webui
from safetensors.torch import load_file, save_file
from test_a1111_adapter import (
    Checkpoints,
    Env,
    chunk_tokens,
    clean_state,
    hidden,
    layer_counter,
    max_diff,
    with_slot,
)

from te_switch import hosts
from te_switch.core.errors import TESwitchError
from te_switch.core.selection import Selection, SlotChoice
from te_switch.hosts.engine import SwapEngine

PROMPT = "a red fox sitting in the snow, detailed fur, soft light"
HOSTS = ["reforge", "forge-classic"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("ldm-forge-checkpoints"))


class LdmEnv(Env):
    host: str = ""

    def load(self, family: str, seed: int = 0, *, t5: bool = False) -> Any:
        from modules import sd_models

        return sd_models.load_model(self.info(family, seed))

    def load_path(self, path: Path) -> Any:
        from modules import sd_models

        return sd_models.load_model(sd_models.CheckpointInfo(str(path)))

    def info(self, family: str, seed: int = 0, *, t5: bool = False) -> Any:
        from modules import sd_models

        return sd_models.CheckpointInfo(str(self.checkpoints.path(family, seed)))

    def adapter(self, *, install: bool = True) -> Any:
        from modules import script_callbacks

        from te_switch.hosts.ldm_forge import LdmForgeAdapter

        adapter = LdmForgeAdapter(SwapEngine())
        adapter.resolver = lambda slot, label: self.sources[label]
        if install:
            adapter.install()
            script_callbacks.on_model_loaded(adapter.on_model_loaded)
        return adapter

    def baked(self, family: str, prefix: str, encoder_sd: dict[str, torch.Tensor]) -> Path:
        """The family's checkpoint with ``prefix + key`` replaced by the file's tensors (what merging offline gives)."""
        sd = load_file(str(self.checkpoints.path(family)))
        replaced = 0
        for key, value in encoder_sd.items():
            # transformers >= 5.6 checkpoints have no text_model level; SD1/SDXL-L never use the projection
            target = next((t for t in (prefix + key, prefix + key.replace("text_model.", "", 1)) if t in sd), None)
            if target is not None:
                sd[target] = value.to(sd[target].dtype)
                replaced += 1
        assert replaced >= len(encoder_sd) - 2, f"only {replaced} of {len(encoder_sd)} tensors have a place"
        path = self.folder / f"baked-{family}-{len(self.sources)}.safetensors"
        save_file(sd, str(path))
        return path


@pytest.fixture(params=HOSTS)
def env(request: pytest.FixtureRequest, checkpoints: Checkpoints, tmp_path: Path) -> Iterator[LdmEnv]:
    with fake_webui(request.param):
        from modules import devices, shared, shared_options  # noqa: F401

        devices.dtype = devices.dtype_unet = devices.dtype_inference = torch.float32
        shared.opts.CLIP_stop_at_last_layers = 1
        e = LdmEnv(checkpoints, tmp_path)
        e.host = request.param
        yield e


def encode(model: Any, prompts: list[str] | None = None) -> dict[str, torch.Tensor]:
    from modules import prompt_parser

    batch = prompt_parser.SdConditioning(prompts or [PROMPT], width=1024, height=1024)
    with torch.no_grad():
        d = model.get_learned_conditioning(batch)
    return dict(d) if isinstance(d, dict) else {"crossattn": d}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"{key} differs by {max_diff(a[key], b[key]):.3g}"


def run(adapter: Any, selection: Selection, model: Any, prompts: list[str] | None = None) -> dict[str, torch.Tensor]:
    adapter.apply(selection)
    adapter.begin(selection)
    try:
        return encode(model, prompts)
    finally:
        adapter.end()


def live(model: Any) -> None:
    """Switch to an already loaded model the way reForge does: no load, no callback."""
    from modules import sd_models

    sd_models.model_data.set_sd_model(model, already_loaded=True)


def load_built_in(env: LdmEnv, adapter: Any, path: Path) -> Any:
    """``path`` loaded as it is: a load re-applies the last request, so Built-in is asked first."""
    adapter.apply(Selection())
    return env.load_path(path)


def holder(model: Any, name: str) -> torch.nn.Module:
    return getattr(model.forge_objects.clip.cond_stage_model, name)


def hf_l_file(env: LdmEnv, seed: int, *, positions: int = 77) -> tuple[str, dict[str, torch.Tensor]]:
    name, _ = env.clip_l_file(seed, positions=positions)
    return name, load_file(env.sources[name].path)


# ---------------------------------------------------------------------------------------------
# host detection


def test_detected_as_an_ldm_forge_from_objects_and_imports(env: LdmEnv) -> None:
    model = env.load("sd1")
    assert hosts.kind_of_model(model) == hosts.LDM_FORGE
    assert hosts.kind_of_environment() == hosts.LDM_FORGE
    adapter = hosts.create(hosts.LDM_FORGE)
    assert adapter.name == env.host
    assert adapter.family(model) == "sd1"
    assert set(adapter.slots(model)) == {"clip_l"}


# ---------------------------------------------------------------------------------------------
# clip skip


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sdxl-refiner"])
@pytest.mark.parametrize("setting", [1, 3])
def test_auto_is_the_host_bit_for_bit(env: LdmEnv, family: str, setting: int) -> None:
    from modules.shared import opts

    opts.CLIP_stop_at_last_layers = setting
    model = env.load(family)
    stock = encode(model)
    adapter = env.adapter()
    assert_same(run(adapter, Selection(), model), stock)
    assert adapter.family(model) == family


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_explicit_clip_skip_equals_the_host_setting_where_it_honours_one(env: LdmEnv, family: str) -> None:
    from modules.shared import opts

    model = env.load(family)
    native = encode(model)
    opts.CLIP_stop_at_last_layers = 3
    host_three = encode(model)
    opts.CLIP_stop_at_last_layers = 1
    ours = run(env.adapter(), Selection(clip_skip=3), model)
    if family == "sdxl" and env.host == "forge-classic":
        assert_same(host_three, native)  # Forge Classic's Clip skip does not reach SDXL: TE Switch's does
        assert not torch.equal(ours["crossattn"], native["crossattn"])
    else:
        assert_same(ours, host_three)
    if family == "sdxl":
        assert torch.equal(ours["vector"], native["vector"])  # pooled: always the last layer


def test_sd1_clip_skip_matches_transformers_and_truncates(env: LdmEnv) -> None:
    import copy

    from transformers import CLIPTextModel

    model = env.load("sd1")
    adapter = env.adapter()
    wrapper = model.cond_stage_model
    transformer = wrapper.wrapped.transformer
    ref = CLIPTextModel(copy.deepcopy(transformer.config)).eval()
    ref.load_state_dict({k: v.float() for k, v in clean_state(transformer).items()})
    tokens = chunk_tokens(wrapper, PROMPT)
    layers = getattr(transformer, "text_model", transformer).encoder.layers
    counts, handles = layer_counter(layers)
    adapter.begin(Selection(clip_skip=2))
    try:
        with torch.no_grad():
            z = wrapper.encode_with_transformers(tokens)
    finally:
        adapter.end()
        for h in handles:
            h.remove()
    assert counts[-1] == 0
    assert counts[-2] == 1
    assert max_diff(z, hidden(ref, tokens, 2, final_ln=True)) < 1e-4


def test_scope_reaches_one_sdxl_tower(env: LdmEnv) -> None:
    model = env.load("sdxl")
    adapter = env.adapter()
    native = encode(model)
    only_l = run(adapter, Selection(clip_skip=4, scope="clip_l"), model)
    only_g = run(adapter, Selection(clip_skip=4, scope="clip_g"), model)
    width_l = holder(model, "clip_l").transformer.config.hidden_size
    assert torch.equal(only_l["crossattn"][..., width_l:], native["crossattn"][..., width_l:])
    assert not torch.equal(only_l["crossattn"][..., :width_l], native["crossattn"][..., :width_l])
    assert torch.equal(only_g["crossattn"][..., :width_l], native["crossattn"][..., :width_l])
    assert not torch.equal(only_g["crossattn"][..., width_l:], native["crossattn"][..., width_l:])


def test_layer_line_follows_each_host(env: LdmEnv) -> None:
    from modules.shared import opts

    env.load("sdxl")
    adapter = env.adapter()
    assert adapter.describe(Selection()).startswith("SDXL · CLIP-L layer 11/12 · CLIP-G layer 31/32 · native")
    opts.CLIP_stop_at_last_layers = 3
    line = adapter.describe(Selection())
    if env.host == "reforge":
        assert "CLIP-L layer 10/12 · CLIP-G layer 30/32" in line
        assert "from reForge's Clip skip setting" in line
        assert "replaces reForge's Clip skip setting" in adapter.describe(Selection(clip_skip=4))
    else:
        assert "CLIP-L layer 11/12 · CLIP-G layer 31/32 · native" in line  # Forge Classic ignores it on SDXL
    assert "CLIP-L layer 9/12 · CLIP-G layer 29/32" in adapter.describe(Selection(clip_skip=4))


# ---------------------------------------------------------------------------------------------
# swaps


def test_sd1_swap_equals_the_baked_checkpoint_and_restores(env: LdmEnv) -> None:
    model = env.load("sd1")
    before = encode(model)
    weights = {k: v.clone() for k, v in holder(model, "clip_l").state_dict().items()}
    adapter = env.adapter()
    name, file_sd = hf_l_file(env, 21)
    swapped = run(adapter, with_slot(Selection(), clip_l=SlotChoice(name)), model)
    assert not torch.equal(swapped["crossattn"], before["crossattn"])
    baked = encode(load_built_in(env, adapter, env.baked("sd1", "cond_stage_model.transformer.", file_sd)))
    assert_same(swapped, baked)  # the swap is the checkpoint with that CLIP-L merged in, bit for bit
    live(model)  # back to the first model without a load: the next generation's apply restores it
    assert_same(run(adapter, Selection(), model), before)
    for key, value in holder(model, "clip_l").state_dict().items():
        assert value.dtype == weights[key].dtype, key
        assert torch.equal(value, weights[key]), key


def test_sdxl_clip_g_swap_equals_the_baked_checkpoint_and_restores(env: LdmEnv) -> None:
    model = env.load("sdxl")
    before = encode(model)
    adapter = env.adapter()
    name, _ref = env.open_clip_file("ViT-bigG-14", 31)
    swapped = run(adapter, with_slot(Selection(), clip_g=SlotChoice(name)), model)
    assert not torch.equal(swapped["vector"], before["vector"])  # the pooled vector (and its projection) too
    file_sd = load_file(env.sources[name].path)
    baked = encode(load_built_in(env, adapter, env.baked("sdxl", "conditioner.embedders.1.model.", file_sd)))
    assert_same(swapped, baked)
    live(model)
    assert_same(run(adapter, Selection(), model), before)


def own_weights(model: Any, names: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.clone() for k, v in holder(model, n).state_dict().items()} for n in names}


def assert_weights(model: Any, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    for name, own in weights.items():
        for key, value in holder(model, name).state_dict().items():
            assert value.dtype == own[key].dtype, (name, key)
            assert torch.equal(value, own[key]), (name, key)


def test_the_fake_loader_fills_every_tower_from_the_checkpoint(env: LdmEnv) -> None:
    """Both towers hold the checkpoint's values (a key the conversion misspells would leave a tower as
    built, and every comparison of this module would pass on garbage)."""
    model = env.load("sdxl")
    sd = load_file(str(env.checkpoints.path("sdxl")))
    g = sd["conditioner.embedders.1.model.token_embedding.weight"]
    l_key = next(k for k in sd if k.startswith("conditioner.embedders.0.") and k.endswith("token_embedding.weight"))
    for name, expected in (("clip_g", g), ("clip_l", sd[l_key])):
        table = next(v for k, v in holder(model, name).state_dict().items() if k.endswith("token_embedding.weight"))
        assert torch.equal(table, expected.to(table.dtype)), name
    projection = holder(model, "clip_g").text_projection
    assert torch.equal(projection, sd["conditioner.embedders.1.model.text_projection"].to(projection.dtype))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_built_in_comes_back_from_the_checkpoint_file_without_a_copy(env: LdmEnv, family: str) -> None:
    model = env.load(family)
    names = ("clip_l",) if family == "sd1" else ("clip_l", "clip_g")
    weights = own_weights(model, names)
    adapter = env.adapter()
    said: list[str] = []
    adapter.engine.notify = said.append
    chosen = {"clip_l": SlotChoice(env.clip_l_file(40)[0])}
    if family == "sdxl":
        chosen["clip_g"] = SlotChoice(env.open_clip_file("ViT-bigG-14", 41)[0])
    run(adapter, with_slot(Selection(), **chosen), model)
    slots = adapter.slots(model)
    # at most logit_scale, a scalar the file's conversion drops and no swap writes: kept quietly
    assert max(adapter.engine.kept_bytes(slots[n]) for n in names) <= 4, said
    assert said == []  # no "keeping a … copy … on CPU" line: the checkpoint gives every tensor back
    live(model)
    run(adapter, Selection(), model)
    assert_weights(model, weights)


def test_built_in_of_weights_changed_in_memory_is_kept_and_restored_exactly(env: LdmEnv) -> None:
    model = env.load("sd1")
    fc1 = next(m for k, m in holder(model, "clip_l").named_modules() if k.endswith("layers.2.mlp.fc1"))
    with torch.no_grad():
        fc1.weight.add_(0.01)  # merged in memory: the checkpoint no longer holds this tensor
    weights = own_weights(model, ("clip_l",))
    adapter = env.adapter()
    said: list[str] = []
    adapter.engine.notify = said.append
    run(adapter, with_slot(Selection(), clip_l=SlotChoice(env.clip_l_file(42)[0])), model)
    kept = adapter.engine.kept_bytes(adapter.slots(model)["clip_l"])
    assert fc1.weight.nbytes <= kept <= fc1.weight.nbytes + 4  # that tensor (and at most logit_scale)
    assert len(said) == 1, said
    assert "keeping a" in said[0]
    live(model)
    run(adapter, Selection(), model)
    assert_weights(model, weights)


def test_lora_is_undone_before_the_swap_and_merged_onto_the_new_weights(env: LdmEnv) -> None:
    from ldm_patched.modules.sd import load_lora_for_models

    def with_lora(model: Any) -> None:
        live = holder(model, "clip_l").state_dict()
        inner = next(k for k in live if k.endswith("encoder.layers.3.mlp.fc1.weight"))
        key, shape = f"clip_l.{inner}", live[inner].shape
        delta = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 0.05
        objects = model.forge_objects
        _, objects.clip = load_lora_for_models(None, objects.clip, {key: delta}, 1.0, 1.0)
        model.forge_objects_after_applying_lora = objects.shallow_copy()

    model = env.load("sd1")
    with_lora(model)
    adapter = env.adapter()
    with_lora_before = run(adapter, Selection(), model)  # LoRA merged when the wrapper loaded the patcher
    name, file_sd = hf_l_file(env, 22)
    swapped = run(adapter, with_slot(Selection(), clip_l=SlotChoice(name)), model)
    baked = load_built_in(env, adapter, env.baked("sd1", "cond_stage_model.transformer.", file_sd))
    with_lora(baked)
    assert_same(swapped, encode(baked))
    live(model)
    assert_same(run(adapter, Selection(), model), with_lora_before)


def test_long_clip_on_sd1_gives_one_chunk_of_248_and_back(env: LdmEnv) -> None:
    model = env.load("sd1")
    adapter = env.adapter()
    name, _ = hf_l_file(env, 23, positions=248)
    long_prompt = " ".join(["word"] * 200)
    z = run(adapter, with_slot(Selection(), clip_l=SlotChoice(name)), model, [long_prompt])["crossattn"]
    assert z.shape[1] == 248
    assert model.cond_stage_model.chunk_length == 246
    assert adapter.status()["slots"]["clip_l"]["positions"] == 248
    z = run(adapter, Selection(), model, [long_prompt])["crossattn"]
    assert z.shape[1] == 3 * 77
    assert model.cond_stage_model.chunk_length == 75


def test_long_clip_on_sdxl_stretches_clip_g(env: LdmEnv) -> None:
    model = env.load("sdxl")
    adapter = env.adapter()
    name, _ = hf_l_file(env, 24, positions=248)
    z = run(adapter, with_slot(Selection(), clip_l=SlotChoice(name)), model, [" ".join(["word"] * 200)])
    slots = adapter.status()["slots"]
    assert slots["clip_l"]["positions"] == slots["clip_g"]["positions"] == 248
    assert z["crossattn"].shape[1] == 248
    run(adapter, Selection(), model)
    assert adapter.status()["slots"]["clip_g"]["positions"] == 77


def test_fp32_slot_computes_in_fp32(env: LdmEnv) -> None:
    model = env.load("sd1")
    adapter = env.adapter()
    name, ref = env.clip_l_file(25)  # transformers, fp32, holding the file's weights
    wrapper = model.cond_stage_model
    tokens = chunk_tokens(wrapper, PROMPT)
    want = hidden(ref, tokens, 1, final_ln=True)

    def z_for(precision: str) -> torch.Tensor:
        selection = with_slot(Selection(), clip_l=SlotChoice(name, precision))
        adapter.apply(selection)
        adapter.begin(selection)
        try:
            with torch.no_grad():
                return wrapper.encode_with_transformers(tokens)
        finally:
            adapter.end()

    fp32 = z_for("fp32")
    assert holder(model, "clip_l").transformer.get_input_embeddings().weight.dtype == torch.float32
    auto = z_for("auto")  # the host's fp16 weights
    assert fp32.dtype == auto.dtype == torch.float32
    assert max_diff(fp32, want) < 1e-5 < max_diff(auto, want)
    adapter.apply(Selection())
    fc1 = next(p for n, p in holder(model, "clip_l").named_parameters() if n.endswith("layers.0.mlp.fc1.weight"))
    assert fc1.dtype == torch.float16  # back to the host's own


def test_a_wrong_file_is_refused_and_nothing_changes(env: LdmEnv) -> None:
    model = env.load("sd1")
    adapter = env.adapter()
    before = encode(model)
    name, _ = env.open_clip_file("ViT-bigG-14", 26)
    with pytest.raises(TESwitchError) as info:
        adapter.apply(with_slot(Selection(), clip_l=SlotChoice(name)))
    assert "\n" not in str(info.value)
    assert_same(run(adapter, Selection(), model), before)


def test_a_reload_builds_new_objects_and_the_choice_follows(env: LdmEnv) -> None:
    model = env.load("sd1")
    adapter = env.adapter()
    name, _ = hf_l_file(env, 27)
    swapped = run(adapter, with_slot(Selection(), clip_l=SlotChoice(name)), model)
    reloaded = env.load("sd1")  # on_model_loaded re-applies to the new encoder objects
    assert reloaded is not model
    assert adapter.status()["slots"]["clip_l"]["encoder"] == name
    adapter.begin(adapter.requested)
    try:
        assert_same(encode(reloaded), swapped)
    finally:
        adapter.end()


def test_reforge_text_encoder_setting_is_named_and_ours_wins(env: LdmEnv) -> None:
    if env.host != "reforge":
        pytest.skip("Forge Classic has no Text Encoder setting")
    from modules import sd_text_encoder
    from modules.shared import opts

    other = env.checkpoints.path("sd1", seed=1)
    sd_text_encoder.add_option(str(other))
    opts.sd_text_encoder = f"TE: {other.stem}"
    try:
        other_own = encode(env.load_path(other))
        model = env.load("sd1")
        adapter = env.adapter()
        assert f"text encoders from reForge's Text Encoder 'TE: {other.stem}'" in adapter.describe(Selection())
        assert adapter.status()["host_text_encoder"] == f"TE: {other.stem}"
        assert_same(encode(model), other_own)  # the setting's encoders are the Built-in
        name, file_sd = hf_l_file(env, 28)
        selection = with_slot(Selection(), clip_l=SlotChoice(name))
        assert "text encoders from TE Switch" in adapter.describe(selection)
        said: list[str] = []
        adapter.engine.notify = said.append
        ours = run(adapter, selection, model)
        assert said == []  # Built-in is the setting's file, read back from it: no copy
        live(model)
        assert_same(run(adapter, Selection(), model), other_own)
        opts.sd_text_encoder = "Automatic"
        assert_same(
            ours, encode(load_built_in(env, adapter, env.baked("sd1", "cond_stage_model.transformer.", file_sd)))
        )
    finally:
        opts.sd_text_encoder = "Automatic"
        sd_text_encoder.text_encoder_options.clear()
        sd_text_encoder.current_text_encoder_option = None


def test_a_reload_with_other_encoders_never_serves_the_cached_cond(env: LdmEnv) -> None:
    """reForge's Text Encoder setting reloads the same checkpoint with other encoders, and the host's cond-cache
    key (prompt, checkpoint info, clip skip) does not change with it."""
    if env.host != "reforge":
        pytest.skip("Forge Classic has no Text Encoder setting")
    from modules import processing, sd_models, sd_text_encoder
    from modules.shared import opts

    other = env.checkpoints.path("sd1", seed=1)
    other_own = encode(env.load_path(other))["crossattn"][0]
    info = env.info("sd1")  # one CheckpointInfo, as the host keeps one per file
    sd_models.load_model(info)
    adapter = env.adapter()

    def generate() -> torch.Tensor:
        p = processing.StableDiffusionProcessingTxt2Img(prompt=PROMPT, negative_prompt="lowres", steps=20)
        adapter.begin(Selection())
        try:
            p.setup_prompts()
            p.setup_conds()
        finally:
            adapter.end()
        return p.c.batch[0][0].schedules[0].cond

    own = generate()
    sd_text_encoder.add_option(str(other))
    opts.sd_text_encoder = f"TE: {other.stem}"
    try:
        sd_models.load_model(info)  # the setting's forced reload
        assert torch.equal(generate(), other_own)
        assert not torch.equal(own, other_own)
    finally:
        opts.sd_text_encoder = "Automatic"
        sd_text_encoder.text_encoder_options.clear()
        sd_text_encoder.current_text_encoder_option = None


def test_install_is_idempotent_and_uninstall_restores(env: LdmEnv) -> None:
    from modules import processing
    from modules_forge import forge_clip

    originals = (forge_clip.CLIP_SD_15_L.encode_with_transformers, processing.StableDiffusionProcessing.cached_params)
    adapter = env.adapter(install=False)
    adapter.install()
    patched = forge_clip.CLIP_SD_15_L.encode_with_transformers
    adapter.install()
    assert forge_clip.CLIP_SD_15_L.encode_with_transformers is patched is not originals[0]
    adapter.uninstall()
    now = (forge_clip.CLIP_SD_15_L.encode_with_transformers, processing.StableDiffusionProcessing.cached_params)
    assert now == originals
