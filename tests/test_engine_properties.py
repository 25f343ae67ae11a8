"""Property test of the swap engine: random sequences of swaps (one slot or two at once), Built-in,
precision changes, host reloads and failing swaps on a two-slot model — a CLIP-L and a T5 encoder with
its tied table (Flux's pair) — loaded from checkpoints (copied into the parameters, or left as views
of the files' mappings as transformers and Forge leave them).

Invariants after every step:

* Built-in at Auto is the original bit for bit, the engine keeps nothing of the slot, and no incoming
  file stays mapped;
* a swap computes exactly what a reference module built from that file alone computes, at the
  precision asked;
* a failing swap (NaN inside, the wrong kind for the slot, a truncated file) changes neither slot, even
  when it comes together with a good file for the other slot;
* the engine never keeps a CPU copy of a slot it can restore from the file, and anonymous memory does
  not grow from one sequence to the next.

``TE_SWITCH_PROPERTY_EXAMPLES`` sets the number of sequences (CI: 60, under a minute on 2 idle
cores; a soak run: 1000+).
"""

from __future__ import annotations

import gc
import os
from dataclasses import replace
from pathlib import Path

import filemakers as fm
import pytest
import refmodels as rm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from swaps import bits, hf_clip, hf_file, make_t5, same_bits, save, source, t5_encode, t5_ids
from test_restore import builtin_of, checkpoint, loaded

from te_switch.core.detect import detect
from te_switch.core.errors import TESwitchError
from te_switch.core.readers import open_file
from te_switch.core.selection import SlotChoice
from te_switch.hosts.engine import BuiltinSource, SlotRequest, SwapEngine
from te_switch.hosts.slots import hf_clip_slot, t5_slot

EXAMPLES = int(os.environ.get("TE_SWITCH_PROPERTY_EXAMPLES", "60"))
IDS = torch.randint(0, rm.SMALL_VOCAB, (1, 77), generator=torch.Generator().manual_seed(0))
T5_IDS = t5_ids(0)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ANON_GROWTH = 64 << 20  # what a sequence may leave behind, page rounding and allocator slack included


def t5_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k}


def t5_source(path: Path, kind: str = "t5-xxl") -> object:
    """The tiny T5 is a T5-XXL in all but width."""
    src = source(path, kind)
    return replace(src, tower=replace(src.tower, kind=kind))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("props")
    ckpt, _ = checkpoint(folder, 1)
    t5_ckpt = save(folder / "t5-checkpoint.safetensors", t5_state(make_t5(11).half()))
    with open_file(t5_ckpt) as src:
        t5_builtin = BuiltinSource(str(t5_ckpt), replace(detect(src)[0], kind="t5-xxl"))
    clip = {}
    for seed in (2, 3):
        path, donor = hf_file(folder, seed, proj=False)
        clip[str(seed)] = (source(path, "clip-l"), donor)
    long_path, long_donor = hf_file(folder, 4, proj=False, positions=248)
    clip["long"] = (source(long_path, "long-clip-l"), long_donor)
    t5 = {}
    for seed, dtype in ((12, torch.float16), (13, torch.float32)):
        donor = make_t5(seed).to(dtype)
        t5[str(seed)] = (t5_source(save(folder / f"t5-{seed}.safetensors", t5_state(donor))), donor)
    nan = fm.hf_clip_state(hf_clip(5))
    nan["text_model.final_layer_norm.weight"][0] = float("nan")
    t5_nan = t5_state(make_t5(14))
    t5_nan["encoder.block.1.layer.1.DenseReluDense.wo.weight"][3, 2] = float("inf")
    truncated = folder / "truncated.safetensors"  # resolved whole, cut short before the swap reads it
    truncated.write_bytes(Path(clip["2"][0].path).read_bytes())
    resolved_truncated = source(truncated, "clip-l")
    truncated.write_bytes(truncated.read_bytes()[:5000])
    bad = {
        ("clip_l", "nan"): source(save(folder / "nan.safetensors", nan), "clip-l"),
        ("clip_l", "truncated"): resolved_truncated,
        ("t5xxl", "truncated"): replace(resolved_truncated, tower=replace(resolved_truncated.tower, kind="t5-xxl")),
        ("clip_l", "kind"): source(Path(clip["2"][0].path), "t5-xxl"),
        ("t5xxl", "nan"): t5_source(save(folder / "t5-nan.safetensors", t5_nan)),
        ("t5xxl", "kind"): t5_source(Path(t5["12"][0].path), "clip-l"),
    }
    return {
        "ckpt": ckpt,
        "t5_ckpt": t5_ckpt,
        "t5_builtin": t5_builtin,
        "clip_l": clip,
        "t5xxl": t5,
        "bad": bad,
        "incoming": {os.path.realpath(s.path) for s, _ in [*clip.values(), *t5.values()]},
    }


SLOTS = st.sampled_from(["clip_l", "t5xxl", "both"])
PRECISION = st.sampled_from(["auto", "fp32", "bf16", "fp16"])
STEPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("swap"), SLOTS, st.sampled_from(["2", "3", "long"]), st.sampled_from(["12", "13"]), PRECISION
        ),
        st.tuples(st.just("builtin"), SLOTS, st.just(""), st.just(""), st.sampled_from(["auto", "auto", "fp32"])),
        st.tuples(
            st.just("fail"),
            st.sampled_from(["clip_l", "t5xxl"]),
            st.sampled_from(["nan", "kind", "truncated"]),
            st.sampled_from(["", "12", "3"]),  # a good file for the other slot in the same call
            st.just("auto"),
        ),
        st.tuples(st.just("reload"), st.just("both"), st.just(""), st.just(""), st.just("auto")),
    ),
    min_size=1,
    max_size=8,
)


def clip_output(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).last_hidden_state.float()


def positions_of(model: torch.nn.Module) -> int:
    text = getattr(model, "text_model", model)
    return int(text.embeddings.position_embedding.weight.shape[0])


def clip_reference(donor: torch.nn.Module, precision: str) -> torch.nn.Module:
    reference = rm.make_hf_clip(64, 2, 4, vocab=rm.SMALL_VOCAB, positions=positions_of(donor), seed=0)
    reference.load_state_dict(donor.state_dict())
    return reference.to(DTYPES.get(precision, torch.float16))  # Auto: the slot's own fp16


def t5_reference(donor: torch.nn.Module, precision: str) -> torch.nn.Module:
    reference = make_t5(0)
    reference.load_state_dict(donor.state_dict())
    reference.to(DTYPES.get(precision, torch.float16))
    if precision == "fp16":  # what transformers does, and the slot too: `wo` stays fp32, from the file's values
        own = donor.state_dict()
        for name, param in reference.named_parameters():
            if name.endswith("DenseReluDense.wo.weight"):
                param.data = own[name].float()
    return reference


def load_t5(path: Path, *, mapped: bool) -> torch.nn.Module:
    """A T5 as a host loads it: copied in, or as views of the file (the tied table stays one Parameter)."""
    model = make_t5(0).half()
    live = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in load_file(str(path)).items():
            if mapped:
                live[key].data = value
            else:
                live[key].copy_(value)
    assert model.shared.weight is model.encoder.embed_tokens.weight
    return model


def mapped_incoming(files: dict) -> set[str]:
    """Incoming files some live tensor still maps (read from /proc/self/maps)."""
    gc.collect()
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = {line.split(maxsplit=5)[5].strip() for line in f if len(line.split(maxsplit=5)) == 6}
    except OSError:
        return set()
    return paths & files["incoming"]


def rss_anon() -> int:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


_anon: list[int] = []


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=STEPS, mapped=st.booleans())
def test_random_sequences_keep_the_invariants(files: dict, steps: list[tuple], mapped: bool) -> None:
    clip = loaded(files["ckpt"], mapped=mapped)
    t5 = load_t5(files["t5_ckpt"], mapped=mapped)
    original = {"clip_l": bits(clip), "t5xxl": bits(t5)}
    models = {"clip_l": clip, "t5xxl": t5}
    slots = {"clip_l": hf_clip_slot("clip_l", clip), "t5xxl": t5_slot("t5xxl", t5)}
    builtins = {"clip_l": builtin_of(files["ckpt"]), "t5xxl": files["t5_builtin"]}
    engine = SwapEngine(notify=pytest.fail)
    # what each slot should hold: None (the original bits), ("file", donor, precision), ("builtin", precision)
    holds: dict[str, tuple | None] = {"clip_l": None, "t5xxl": None}

    def request(slot: str, src: object, precision: str = "auto") -> SlotRequest:
        label = getattr(src, "label", None)
        return SlotRequest(slots[slot], SlotChoice(label, precision), src, None, lambda: builtins[slot])

    for op, which, clip_arg, t5_arg, precision in steps:
        names = ["clip_l", "t5xxl"] if which == "both" else [which]
        if op == "swap":
            picked = {"clip_l": files["clip_l"][clip_arg], "t5xxl": files["t5xxl"][t5_arg]}
            engine.apply([request(n, picked[n][0], precision) for n in names])
            holds.update({n: ("file", picked[n][1], precision) for n in names})
        elif op == "builtin":
            engine.apply([request(n, None, precision) for n in names])
            holds.update(dict.fromkeys(names, None if precision == "auto" else ("builtin", precision)))
        elif op == "fail":
            before = {n: bits(m) for n, m in models.items()}
            requests = [request(which, files["bad"][(which, clip_arg)])]
            other = "t5xxl" if which == "clip_l" else "clip_l"
            if t5_arg:  # a good file for the other slot first: it must not land either
                requests.insert(0, request(other, files[other]["12" if other == "t5xxl" else "3"][0]))
            with pytest.raises(TESwitchError):
                engine.apply(requests)
            for n, m in models.items():
                assert same_bits(m, before[n]), n
        else:  # the host reloads the checkpoints into the same modules: Built-in first (restore_before_load)
            for n in names:
                engine.restore(slots[n])
                holds[n] = None
        for n, held in holds.items():
            check_slot(n, models[n], held, original[n])
            assert (engine.applied(slots[n]) is None) == (held is None), n
            assert engine.kept_bytes(slots[n]) == 0
    engine.apply([request(n, None) for n in slots])
    for n in slots:
        assert same_bits(models[n], original[n]), n
    assert not mapped_incoming(files)
    engine = None  # the models and the engine go with this frame
    gc.collect()
    _anon.append(rss_anon())
    if len(_anon) > 10:
        assert _anon[-1] - min(_anon[5:10]) < ANON_GROWTH, f"anon memory grew {(_anon[-1] - min(_anon[5:10])) >> 20} MB"


def check_slot(name: str, model: torch.nn.Module, held: tuple | None, original: dict) -> None:
    if held is None:
        assert same_bits(model, original), name
    elif held[0] == "builtin":  # the checkpoint's own values cast to the precision asked
        want, live = DTYPES[held[1]], dict(model.named_parameters(remove_duplicate=False))
        for key, (dtype, shape, data) in original.items():
            if key not in live or not dtype.is_floating_point:
                continue
            keep = name == "t5xxl" and held[1] == "fp16" and key.endswith("DenseReluDense.wo.weight")
            expect = data.view(dtype).reshape(shape).to(torch.float32 if keep else want)
            assert torch.equal(live[key].detach(), expect), (name, key)
    elif name == "clip_l":
        assert torch.equal(clip_output(model), clip_output(clip_reference(held[1], held[2])))
    else:
        for got, want in zip(t5_encode(model, T5_IDS), t5_encode(t5_reference(held[1], held[2]), T5_IDS), strict=True):
            assert torch.equal(got, want)
