"""hosts.base.HostAdapter through a minimal concrete adapter: requests, atomic apply, reapply, describe, status."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import filemakers as fm
import pytest
import refmodels as rm
import torch
from swaps import (
    assert_bits,
    assert_same,
    bits,
    hf_clip,
    hf_file,
    hf_weights,
    one_line_error,
    openclip,
    openclip_file,
    save,
    source,
)
from torch import nn

from te_switch.core.clip_skip import TowerPlan
from te_switch.core.errors import TESwitchError
from te_switch.core.longclip import stretch_positions
from te_switch.core.selection import Selection, SlotChoice
from te_switch.hosts.base import HostAdapter
from te_switch.hosts.engine import EncoderSource, LiveSlot, SwapEngine
from te_switch.hosts.slots import hf_clip_slot, openclip_slot, text_transformer

# ---------------------------------------------------------------------------------------------
# HostAdapter (hosts/base.py) through a minimal concrete adapter


class FakeModel:
    def __init__(self, family: str, towers: Mapping[str, nn.Module]) -> None:
        self.family = family
        self.towers = dict(towers)


class TinyAdapter(HostAdapter):
    name = "tiny"

    def __init__(self, model: FakeModel | None, engine: SwapEngine) -> None:
        super().__init__(engine)
        self.model = model
        self.swapped: list[list[str]] = []
        self.note: str | None = None
        self.auto: list[TowerPlan] | None = None

    def live_model(self) -> FakeModel | None:
        return self.model

    def family(self, model: FakeModel) -> str | None:
        return model.family

    def slots(self, model: FakeModel) -> dict[str, LiveSlot]:
        return {
            name: openclip_slot(name, m) if isinstance(m, rm.OpenClipTextTransformer) else hf_clip_slot(name, m)
            for name, m in model.towers.items()
        }

    def auto_plans(self, model: Any, family: str) -> list[TowerPlan]:
        return self.auto if self.auto is not None else super().auto_plans(model, family)

    def layer_note(self, model: Any, family: str, selection: Selection) -> str | None:
        return self.note

    def after_swap(self, model: Any) -> None:
        # what the model holds when the host's bookkeeping runs: every commit is done by then
        self.swapped.append([name for name, slot in self.slots(model).items() if self.engine.applied(slot)])

    def install(self) -> None:
        pass

    def uninstall(self) -> None:
        pass


def sdxl() -> FakeModel:
    return FakeModel("sdxl", {"clip_l": hf_clip(10), "clip_g": openclip(11)})


@pytest.fixture
def library(tmp_path: Path) -> dict[str, EncoderSource]:
    long_l, _ = hf_file(tmp_path, 21, positions=248, name="long.safetensors")
    plain_l, _ = hf_file(tmp_path, 20, name="plain.safetensors")
    g, _ = openclip_file(tmp_path, 22)
    nan = fm.openclip_state(openclip(23))
    nan["ln_final.weight"][0] = float("inf")
    bad = save(tmp_path / "bad-g.safetensors", nan)
    return {
        "long": source(long_l, "long-clip-l", label="long"),
        "plain": source(plain_l, "clip-l", label="plain"),
        "g": source(g, "clip-g", label="g"),
        "bad-g": source(bad, "clip-g", label="bad-g"),
    }


def resolver(lib: Mapping[str, EncoderSource]) -> Callable[[str, str], EncoderSource]:
    def resolve(slot: str, label: str) -> EncoderSource:
        if label not in lib:
            raise TESwitchError(f"{label}: not in the encoder folders")
        return lib[label]

    return resolve


def sel(**slots: str) -> Selection:
    return Selection(slots={k: SlotChoice(v) for k, v in slots.items()})


@pytest.mark.parametrize(
    ("family", "towers", "choice", "g_positions"),
    [
        ("sdxl", ("clip_l", "clip_g"), "long", 248),
        ("sdxl", ("clip_l", "clip_g"), "plain", None),
        ("sdxl", ("clip_l", "clip_g"), None, None),
        ("sd1", ("clip_l",), "long", None),
        ("sdxl-refiner", ("clip_g",), "long", None),
    ],
)
def test_requests_stretch_clip_g_only_beside_a_long_clip_l(
    library: dict[str, EncoderSource], family: str, towers: tuple[str, ...], choice: str | None, g_positions: int | None
) -> None:
    made = {"clip_l": lambda: hf_clip(10), "clip_g": lambda: openclip(11)}
    adapter = TinyAdapter(FakeModel(family, {t: made[t]() for t in towers}), SwapEngine())
    selection = sel(clip_l=choice) if choice else Selection()
    requests = {r.slot.name: r for r in adapter.requests(adapter.model, selection, resolver(library))}
    assert set(requests) == set(towers)
    if "clip_l" in requests:
        assert requests["clip_l"].positions is None
        assert requests["clip_l"].source == (library[choice] if choice else None)
    if "clip_g" in requests:
        assert requests["clip_g"].positions == g_positions
        assert requests["clip_g"].source is None


def test_adapter_apply_long_clip_on_sdxl_and_back(library: dict[str, EncoderSource]) -> None:
    model = sdxl()
    before_l, before_g = bits(model.towers["clip_l"]), bits(model.towers["clip_g"])
    g_table = model.towers["clip_g"].positional_embedding.detach().clone()
    adapter = TinyAdapter(model, SwapEngine())
    adapter.resolver = resolver(library)

    assert sorted(adapter.apply(sel(clip_l="long"))) == ["clip_g", "clip_l"]
    assert adapter.swapped == [["clip_l", "clip_g"]]
    assert text_transformer(model.towers["clip_l"]).embeddings.position_embedding.weight.shape[0] == 248
    assert torch.equal(model.towers["clip_g"].positional_embedding, stretch_positions(g_table))
    assert model.towers["clip_g"].attn_mask.shape == (248, 248)
    status = adapter.status()
    assert {n: s["positions"] for n, s in status["slots"].items()} == {"clip_l": 248, "clip_g": 248}

    assert sorted(adapter.apply(Selection())) == ["clip_g", "clip_l"]
    assert_bits(model.towers["clip_l"], before_l)
    assert_bits(model.towers["clip_g"], before_g)
    assert adapter.apply(Selection()) == []
    assert len(adapter.swapped) == 2  # no bookkeeping for a no-op


def test_adapter_apply_is_atomic_across_slots(library: dict[str, EncoderSource]) -> None:
    model = sdxl()
    before_l, before_g = bits(model.towers["clip_l"]), bits(model.towers["clip_g"])
    adapter = TinyAdapter(model, SwapEngine())
    adapter.resolver = resolver(library)
    for selection in (sel(clip_l="plain", clip_g="bad-g"), sel(clip_l="plain", clip_g="missing")):
        with pytest.raises(TESwitchError) as err:
            adapter.apply(selection)
        one_line_error(err.value)
        assert_bits(model.towers["clip_l"], before_l)
        assert_bits(model.towers["clip_g"], before_g)
    assert adapter.requested is None
    assert adapter.swapped == []
    assert adapter.engine.epoch == 0


def test_adapter_apply_without_model_or_resolver(library: dict[str, EncoderSource]) -> None:
    adapter = TinyAdapter(None, SwapEngine())
    assert adapter.apply(sel(clip_l="plain")) == []
    adapter.model = sdxl()
    with pytest.raises(RuntimeError, match="resolver"):
        adapter.apply(sel(clip_l="plain"))
    assert adapter.apply(sel(clip_l="plain"), resolver(library)) == ["clip_l"]


def test_reapply_puts_the_request_onto_fresh_modules(library: dict[str, EncoderSource]) -> None:
    adapter = TinyAdapter(sdxl(), SwapEngine())
    assert adapter.reapply() == []  # nothing requested yet
    adapter.resolver = resolver(library)
    selection = sel(clip_l="plain", clip_g="g")
    adapter.apply(selection)
    assert adapter.requested == selection
    swapped = hf_weights(adapter.model.towers["clip_l"])

    adapter.model = sdxl()  # the host reloaded the checkpoint: new module objects, built-in weights
    fresh_before = bits(adapter.model.towers["clip_l"])
    assert sorted(adapter.reapply()) == ["clip_g", "clip_l"]
    assert_same(hf_weights(adapter.model.towers["clip_l"]), swapped)
    assert adapter.swapped[-1] == ["clip_l", "clip_g"]
    adapter.apply(Selection())
    assert_bits(adapter.model.towers["clip_l"], fresh_before)


@pytest.mark.parametrize(
    ("family", "selection", "line"),
    [
        ("sd1", Selection(), "SD1 · CLIP-L layer 12/12 · native"),
        ("sd1", Selection(clip_skip=2), "SD1 · CLIP-L layer 11/12"),
        ("sd1", Selection(clip_skip=1), "SD1 · CLIP-L layer 12/12 · native"),
        ("sd2", Selection(), "SD2 · CLIP-H layer 23/24 · native"),
        ("sd2", Selection(clip_skip=12), "SD2 · CLIP-H layer 13/24"),
        ("sdxl", Selection(), "SDXL · CLIP-L layer 11/12 · CLIP-G layer 31/32 · native"),
        ("sdxl", Selection(clip_skip=1), "SDXL · CLIP-L layer 12/12 · CLIP-G layer 32/32"),
        ("sdxl", Selection(clip_skip=3, scope="clip_l"), "SDXL · CLIP-L layer 10/12 · CLIP-G layer 31/32"),
        ("sdxl", Selection(clip_skip=3, scope="clip_g"), "SDXL · CLIP-L layer 11/12 · CLIP-G layer 30/32"),
        ("sdxl", Selection(clip_skip=2, scope="clip_g"), "SDXL · CLIP-L layer 11/12 · CLIP-G layer 31/32 · native"),
        ("sdxl-refiner", Selection(), "SDXL refiner · CLIP-G layer 31/32 · native"),
        ("sd3", Selection(clip_skip=12), "SD3 · CLIP-L layer 1/12 · CLIP-G layer 21/32"),
        ("flux", Selection(clip_skip=2), "Flux uses only CLIP-L's pooled output: clip skip has no effect"),
        ("flux", Selection(), "Flux uses only CLIP-L's pooled output: clip skip has no effect"),
    ],
)
def test_describe_lines(family: str, selection: Selection, line: str) -> None:
    adapter = TinyAdapter(FakeModel(family, {}), SwapEngine())
    assert adapter.describe(selection) == line


def test_describe_note_auto_plans_and_no_model() -> None:
    adapter = TinyAdapter(None, SwapEngine())
    assert adapter.describe(Selection()).startswith("No model loaded yet")
    assert adapter.plans(Selection()) == []
    assert adapter.slot_names() == ()
    adapter.model = FakeModel("sd2", {})
    adapter.note = "this host's copy has 23 layers"
    assert (
        adapter.describe(Selection(clip_skip=2)) == "SD2 · CLIP-H layer 23/24 · native · this host's copy has 23 layers"
    )
    # Auto asks the host what it does natively (a host may differ from DESIGN's natives)
    adapter.auto = [TowerPlan("clip_h", 1, 24, True, True)]
    adapter.note = None
    assert adapter.describe(Selection()) == "SD2 · CLIP-H layer 24/24 · native"
    assert adapter.plans(Selection(clip_skip=3))[0].skip == 3
    assert adapter.slot_names() == ("clip_h",)


def test_status_reports_each_slot(library: dict[str, EncoderSource]) -> None:
    adapter = TinyAdapter(None, SwapEngine())
    assert adapter.status() == {"host": "tiny", "family": None, "slots": {}, "epoch": 0}
    adapter.model = sdxl()
    adapter.resolver = resolver(library)
    adapter.apply(Selection(slots={"clip_l": SlotChoice("plain", "fp16")}))
    status = adapter.status()
    assert status == {
        "host": "tiny",
        "family": "sdxl",
        "epoch": adapter.engine.epoch,
        "slots": {
            "clip_l": {"label": "CLIP-L", "encoder": "plain", "hash": "0123456789", "kind": "clip-l",
                       "precision": "fp16", "positions": 77},
            "clip_g": {"label": "CLIP-G", "encoder": "Built-in", "hash": None, "kind": None, "precision": "auto",
                       "positions": 77},
        },
    }  # fmt: skip
    assert adapter.engine.epoch > 0


def test_cond_signature_follows_epoch_and_active_selection(library: dict[str, EncoderSource]) -> None:
    adapter = TinyAdapter(sdxl(), SwapEngine())
    adapter.resolver = resolver(library)
    first = adapter.cond_signature()
    adapter.begin(Selection(clip_skip=2))
    second = adapter.cond_signature()
    assert second != first
    adapter.apply(sel(clip_l="plain"))
    assert adapter.cond_signature() != second
    adapter.end()
    assert adapter.active is None
