"""Property test of the swap engine: random sequences of swaps, Built-in, precision changes, host reloads
and failing swaps on a slot loaded from a checkpoint (copied into its parameters, or as views of the
file's mapping as transformers and Forge leave them).

Invariants after every step: Built-in is the original bit for bit and the engine keeps nothing of the
slot; a swap computes exactly what a reference module built from that file alone computes; a failing
swap changes nothing; the engine never keeps a CPU copy of a slot it can restore from the file.

``TE_SWITCH_PROPERTY_EXAMPLES`` sets the number of sequences (CI: 50, about 15 s of CPU; a soak run: 1000+).
"""

from __future__ import annotations

import os
from pathlib import Path

import filemakers as fm
import pytest
import refmodels as rm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from swaps import bits, hf_clip, hf_file, same_bits, save, source
from test_restore import builtin_of, checkpoint, loaded

from te_switch.core.errors import TESwitchError
from te_switch.core.selection import SlotChoice
from te_switch.hosts.engine import SlotRequest, SwapEngine
from te_switch.hosts.slots import hf_clip_slot

EXAMPLES = int(os.environ.get("TE_SWITCH_PROPERTY_EXAMPLES", "50"))
IDS = torch.randint(0, rm.SMALL_VOCAB, (1, 77), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("props")
    ckpt, _ = checkpoint(folder, 1)
    good = {}
    for seed in (2, 3):
        path, donor = hf_file(folder, seed, proj=False)
        good[str(seed)] = (source(path, "clip-l"), donor)
    long_path, long_donor = hf_file(folder, 4, proj=False, positions=248)
    good["long"] = (source(long_path, "long-clip-l"), long_donor)
    nan = fm.hf_clip_state(hf_clip(5))
    nan["text_model.final_layer_norm.weight"][0] = float("nan")
    truncated = folder / "truncated.safetensors"
    truncated.write_bytes(Path(good["2"][0].path).read_bytes()[:5000])
    bad = {
        "nan": source(save(folder / "nan.safetensors", nan), "clip-l"),
        "kind": source(Path(good["2"][0].path), "t5-xxl"),
    }
    return {"ckpt": ckpt, "good": good, "bad": bad, "truncated": truncated}


STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("swap"), st.sampled_from(["2", "3", "long"]), st.sampled_from(["auto", "fp32", "bf16"])),
        st.tuples(st.just("builtin"), st.just(""), st.sampled_from(["auto", "fp32"])),
        st.tuples(st.just("fail"), st.sampled_from(["nan", "kind", "truncated"]), st.just("auto")),
        st.tuples(st.just("reload"), st.just(""), st.just("auto")),
    ),
    min_size=1,
    max_size=8,
)


def output(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).last_hidden_state.float()


def rm_positions(model: torch.nn.Module) -> int:
    text = getattr(model, "text_model", model)
    return int(text.embeddings.position_embedding.weight.shape[0])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=STEPS, mapped=st.booleans())
def test_random_sequences_keep_the_invariants(files: dict, steps: list[tuple[str, str, str]], mapped: bool) -> None:
    ckpt = files["ckpt"]
    model = loaded(ckpt, mapped=mapped)
    original = bits(model)
    engine = SwapEngine(notify=pytest.fail)
    slot = hf_clip_slot("clip_l", model)
    builtin = builtin_of(ckpt)

    def request(src: object, precision: str = "auto") -> SlotRequest:
        return SlotRequest(slot, SlotChoice(getattr(src, "label", None), precision), src, None, lambda: builtin)

    for op, arg, precision in steps:
        before = bits(model)
        if op == "swap":
            src, donor = files["good"][arg]
            engine.apply([request(src, precision)])
            reference = rm.make_hf_clip(64, 2, 4, vocab=rm.SMALL_VOCAB, positions=rm_positions(donor), seed=0)
            reference.load_state_dict(donor.state_dict())
            if precision != "auto":
                reference.to({"fp32": torch.float32, "bf16": torch.bfloat16}[precision])
            else:
                reference.half()
            assert torch.equal(output(model), output(reference))
        elif op == "builtin":
            engine.apply([request(None, precision)])
            if precision == "auto":
                assert same_bits(model, original)
                assert engine.applied(slot) is None
        elif op == "fail":
            with pytest.raises(TESwitchError):
                engine.apply([request(bad_source(files, arg))])
            assert same_bits(model, before)
        else:  # the host reloads the checkpoint into the same module: Built-in first (restore_before_load)
            engine.restore(slot)
            assert same_bits(model, original)
        assert engine.kept_bytes(slot) == 0
    engine.apply([request(None)])
    assert same_bits(model, original)


def bad_source(files: dict, name: str) -> object:
    """A file that must fail: its header (truncated) fails already when it is resolved."""
    return source(files["truncated"], "clip-l") if name == "truncated" else files["bad"][name]
