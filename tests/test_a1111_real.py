"""The A1111 adapter on the REAL A1111 1.10.1 encoder classes (opt-in, no server, no downloads).

Set ``TE_SWITCH_A1111_WEBUI`` to a stable-diffusion-webui folder (with ``repositories/``),
``TE_SWITCH_A1111_PYTHON`` to its venv's python, and ``HF_HOME`` to a Hugging Face cache holding
``openai/clip-vit-large-patch14``'s tokenizer and config (nothing is downloaded). The check runs in a subprocess (A1111's modules
must not meet the fakes in one process): real ldm/sgm encoders, real ``…WithCustomWords`` wrappers
and ``EmbeddingsWithFixes``, random weights. It holds the same promises as the fake-based tests:

* with the patches installed, Auto is stock bit for bit;
* clip skip N equals A1111's own setting where one exists (SD1 any N, SD2/SDXL-G N=2), equals an
  HF conversion of the OpenCLIP tower otherwise, and the layers after N do not run;
* a CLIP-L swap into the real transformers 4.30 module (persistent ``position_ids``, the hijacked
  ``…token_embedding.wrapped.weight``) matches transformers, and Built-in restores every tensor.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WEBUI = os.environ.get("TE_SWITCH_A1111_WEBUI")
PYTHON = os.environ.get("TE_SWITCH_A1111_PYTHON")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (WEBUI and PYTHON), reason="set TE_SWITCH_A1111_WEBUI and TE_SWITCH_A1111_PYTHON")
def test_adapter_on_real_a1111_encoders(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONDONTWRITEBYTECODE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "IGNORE_CMD_ARGS_ERRORS": "1",
        "TE_SWITCH_SCRATCH": str(tmp_path),
    }
    done = subprocess.run(
        [str(PYTHON), "-B", __file__], cwd=str(WEBUI), env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ALL REAL-A1111 CHECKS PASSED" in done.stdout


# ---------------------------------------------------------------------------------------------
# the check itself (runs inside the WebUI folder, with its venv)


def main() -> None:  # pragma: no cover - runs in the subprocess
    import contextlib

    sys.argv = ["webui.py", "--use-cpu", "all", "--no-half", "--skip-torch-cuda-test"]
    sys.path[:0] = [os.getcwd(), str(ROOT), str(ROOT / "tests")]  # the WebUI folder first, as launch.py has it
    from modules import initialize

    initialize.imports()
    import ldm.modules.encoders.modules as ldm_encoders
    import refmodels as rm
    import sgm.modules.encoders.modules as sgm_encoders
    import torch
    from modules import devices, sd_disable_initialization, sd_hijack, sd_hijack_clip, sd_hijack_open_clip, shared
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from te_switch.core.detect import detect
    from te_switch.core.layouts import openclip_to_canonical
    from te_switch.core.readers import open_file
    from te_switch.core.selection import Selection, SlotChoice
    from te_switch.hosts.a1111 import A1111Adapter
    from te_switch.hosts.engine import EncoderSource, SwapEngine

    torch.set_num_threads(1)
    devices.device, devices.dtype = devices.cpu, torch.float32  # what --use-cpu all --no-half set at startup
    opts, hijack = shared.opts, sd_hijack.model_hijack
    prompts = ["a (red:1.3) fox, [blurry] snow BREAK night sky", " ".join(["word"] * 90) + ", a cat"]
    prompt = "a red fox sitting in the snow, detailed fur, soft light"
    scratch = Path(os.environ["TE_SWITCH_SCRATCH"])

    def build(factory):
        with sd_disable_initialization.DisableInitialization(disable_clip=True):
            module = factory()
        return rm.randomize_(module, 5).eval()

    def encode(wrapper, texts):
        with torch.no_grad():
            out = wrapper(texts)
        return out[0] if isinstance(out, tuple) else out

    def same(a, b, what):
        assert a.dtype == b.dtype, what
        assert torch.equal(a, b), what

    def close(a, b, what, tol=1e-5):
        assert a.shape == b.shape, (what, a.shape, b.shape)
        diff = (a.double() - b.double()).abs().max().item()
        assert diff <= tol, f"{what}: {diff:.3g}"

    def hf_from_openclip(model):
        sd = {k.replace(".wrapped.", "."): v for k, v in model.state_dict().items() if k != "logit_scale"}
        width, blocks = model.positional_embedding.shape[1], model.transformer.resblocks
        config = rm.hf_clip_config(
            width, len(blocks), blocks[0].attn.num_heads, act="gelu", proj_dim=model.text_projection.shape[1]
        )
        ref = CLIPTextModelWithProjection(config).eval()
        rm.load_canonical_into_hf(ref, openclip_to_canonical(sd))
        return ref

    def tokens_of(wrapper, text):
        ids = list(wrapper.tokenize_line(text)[0][0].tokens)
        if wrapper.id_end != wrapper.id_pad:
            first = ids.index(wrapper.id_end)
            ids = ids[: first + 1] + [wrapper.id_pad] * (len(ids) - first - 1)
        return torch.tensor([ids])

    def counting(blocks):
        counts = [0] * len(blocks)
        hooks = [
            b.register_forward_hook(lambda m, a, o, i=i: counts.__setitem__(i, counts[i] + 1))
            for i, b in enumerate(blocks)
        ]
        return counts, hooks

    adapter = A1111Adapter(SwapEngine())
    # ---- SD1: real ldm FrozenCLIPEmbedder (transformers 4.30) in the real wrapper
    sd1 = build(lambda: ldm_encoders.FrozenCLIPEmbedder(device="cpu"))
    sd1.transformer.text_model.embeddings.token_embedding = sd_hijack.EmbeddingsWithFixes(
        sd1.transformer.text_model.embeddings.token_embedding, hijack
    )
    wrapper = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(sd1, hijack)
    stock = {}
    for n in (1, 2, 5):
        opts.CLIP_stop_at_last_layers = n
        stock[n] = encode(wrapper, prompts)
    opts.CLIP_stop_at_last_layers = 1
    adapter.install()
    same(encode(wrapper, prompts), stock[1], "sd1 auto, no generation")
    adapter.begin(Selection())
    same(encode(wrapper, prompts), stock[1], "sd1 auto")
    for n in (2, 5):
        adapter.begin(Selection(clip_skip=n))
        counts, hooks = counting(sd1.transformer.text_model.encoder.layers)
        same(encode(wrapper, prompts), stock[n], f"sd1 N={n}")
        for h in hooks:
            h.remove()
        assert counts == [2] * (13 - n) + [0] * (n - 1), counts  # two chunks each
    adapter.end()

    # a CLIP-L swap through the real hijacked module, then Built-in
    model = type("SD1", (), {})()
    model.cond_stage_model, model.is_sd1 = wrapper, True
    assert adapter.family(model) == "sd1"
    before = {k: v.detach().clone() for k, v in sd1.state_dict().items()}
    file_model = rm.randomize_(CLIPTextModel(sd1.transformer.config), 9).eval()
    path = scratch / "clip-l.safetensors"
    save_file(rm.hf_clip_canonical_sd(file_model), str(path))
    with open_file(path) as src:
        tower = detect(src)[0]
    tower.kind = "clip-l"  # random weights at the real width: detect says clip-l anyway
    source = EncoderSource(str(path), tower, "file")
    adapter.resolver = lambda slot, label: source
    adapter._loading = model  # no model_data here: the adapter's load-callback route
    assert adapter.apply(Selection().with_slot("clip_l", SlotChoice("file"))) == ["clip_l"]
    with torch.no_grad():
        expected = file_model(input_ids=tokens_of(wrapper, prompt)).last_hidden_state
    close(encode(wrapper, [prompt]), expected, "sd1 swapped")
    adapter.apply(Selection())
    adapter._loading = None
    after = sd1.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        same(after[key], value, f"restored {key}")

    # ---- SD2: real ldm FrozenOpenCLIPEmbedder (open_clip 2.20, a small arch: same code path)
    sd2 = build(
        lambda: ldm_encoders.FrozenOpenCLIPEmbedder(arch="ViT-B-32", version=None, device="cpu", layer="penultimate")
    )
    sd2.model.token_embedding = sd_hijack.EmbeddingsWithFixes(sd2.model.token_embedding, hijack)
    wrapper2 = sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords(sd2, hijack)
    stock2 = encode(wrapper2, prompts)
    ref2 = hf_from_openclip(sd2.model)
    for n in (1, 2, 4):
        adapter.begin(Selection(clip_skip=n))
        counts, hooks = counting(sd2.model.transformer.resblocks)
        ours = encode(wrapper2, [prompt])
        for h in hooks:
            h.remove()
        with torch.no_grad():
            out = ref2(input_ids=tokens_of(wrapper2, prompt), output_hidden_states=True)
        close(ours, ref2.text_model.final_layer_norm(out.hidden_states[-n]), f"sd2 N={n}")
        assert counts == [1] * (13 - n) + [0] * (n - 1), counts
        if n == 2:
            same(encode(wrapper2, prompts), stock2, "sd2 N=2")
    adapter.end()
    assert sd2.layer_idx == 1

    # ---- SDXL G: real sgm FrozenOpenCLIPEmbedder2 (legacy=False, pooled)
    g = build(
        lambda: sgm_encoders.FrozenOpenCLIPEmbedder2(
            arch="ViT-B-32", version=None, device="cpu", layer="penultimate", always_return_pooled=True, legacy=False
        )
    )
    g.model.token_embedding = sd_hijack.EmbeddingsWithFixes(
        g.model.token_embedding, hijack, textual_inversion_key="clip_g"
    )
    wrapper_g = sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords(g, hijack)
    with torch.no_grad():
        stock_g = wrapper_g(prompts)
    ref_g = hf_from_openclip(g.model)
    for n in (2, 5):
        adapter.begin(Selection(clip_skip=n))
        with torch.no_grad():
            z, pooled = wrapper_g([prompt])
            if n == 2:
                z2, pooled2 = wrapper_g(prompts)
                same(z2, stock_g[0], "G N=2")
                same(pooled2, stock_g[1], "G pooled")
            out = ref_g(input_ids=tokens_of(wrapper_g, prompt), output_hidden_states=True)
        # un-normalised hidden states at width 512: fused vs split attention sums differ by ~2e-5
        close(z, out.hidden_states[-n], f"G N={n}", tol=1e-4)
        close(pooled, out.text_embeds, f"G pooled N={n}", tol=1e-4)
    adapter.end()
    adapter.uninstall()
    with contextlib.suppress(Exception):
        hijack.fixes = None
    print("ALL REAL-A1111 CHECKS PASSED")


if __name__ == "__main__":  # pragma: no cover
    main()
