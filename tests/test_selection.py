"""core.selection: what users ask for (clip skip, scope, one choice per slot) and its validation."""

from __future__ import annotations

from typing import Any

import pytest

from te_switch.core.selection import (
    ALL_SLOTS,
    BUILT_IN,
    KINDS_BY_SLOT,
    SLOTS_BY_FAMILY,
    Selection,
    SlotChoice,
    parse_clip_skip,
)


@pytest.mark.parametrize("value", [None, "", "  ", "Auto", "auto", " AUTO ", 0, "0", 0.0])
def test_parse_auto(value: object) -> None:
    assert parse_clip_skip(value) is None


@pytest.mark.parametrize(
    ("value", "want"), [("2", 2), (2, 2), (2.0, 2), ("2.0", 2), (" 3 ", 3), (1, 1), ("12", 12), (12, 12)]
)
def test_parse_numbers(value: object, want: int) -> None:
    got = parse_clip_skip(value)
    assert got == want
    assert type(got) is int


@pytest.mark.parametrize("value", [13, "13", -1, "-1", 2.5, "2.5", "x", "two", "1e3", "inf", "nan", float("inf")])
def test_parse_rejects_with_one_line_value_error(value: object) -> None:
    with pytest.raises(ValueError) as err:  # noqa: PT011  (the message is checked below)
        parse_clip_skip(value)
    text = str(err.value)
    assert "\n" not in text
    assert "clip skip" in text


# ---------------------------------------------------------------------------------------------
# SlotChoice / Selection


def test_slot_choice_builtin_spellings() -> None:
    assert SlotChoice().encoder is None
    assert SlotChoice(BUILT_IN).encoder is None
    assert SlotChoice("").encoder is None
    assert SlotChoice().is_builtin
    assert not SlotChoice(precision="fp16").is_builtin  # the checkpoint's weights, but not as the host has them
    assert not SlotChoice("clip-gmp.safetensors").is_builtin
    assert SlotChoice(BUILT_IN) == SlotChoice()


@pytest.mark.parametrize("precision", ["fp8", "FP16", "half", ""])
def test_slot_choice_rejects_unknown_precisions(precision: str) -> None:
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16"):
        SlotChoice(precision=precision)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"clip_skip": 0}, "clip skip"),
        ({"clip_skip": 13}, "clip skip"),
        ({"clip_skip": -2}, "clip skip"),
        ({"scope": "clip_h"}, "scope"),
        ({"scope": "CLIP-L only"}, "scope"),
        ({"slots": {"vae": SlotChoice()}}, "unknown slot 'vae'"),
    ],
)
def test_selection_rejects_bad_values(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as err:
        Selection(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", [2.5, "2"])
def test_selection_holds_only_whole_numbers(value: object) -> None:
    """A Selection is a cache key: 2.5 or '2' must be refused or become the int 2, not kept as given."""
    try:
        selection = Selection(clip_skip=value)  # type: ignore[arg-type]
    except ValueError:
        return
    assert selection.clip_skip == 2
    assert type(selection.clip_skip) is int
    assert selection.signature() == Selection(clip_skip=2).signature()


def test_selection_accepts_every_slot_and_scope() -> None:
    for scope in ("both", "clip_l", "clip_g"):
        assert Selection(clip_skip=2, scope=scope).scope == scope
    full = Selection(slots={name: SlotChoice() for name in ALL_SLOTS})
    assert set(full.slots) == {"clip_l", "clip_g", "clip_h", "t5xxl"}
    assert set(ALL_SLOTS) == set(KINDS_BY_SLOT)
    assert all(set(slots) <= set(ALL_SLOTS) for slots in SLOTS_BY_FAMILY.values())


def test_slot_and_with_slot() -> None:
    base = Selection(clip_skip=2)
    assert base.slot("clip_l") == SlotChoice()
    changed = base.with_slot("clip_l", SlotChoice("long.safetensors", "fp32"))
    assert changed.slot("clip_l") == SlotChoice("long.safetensors", "fp32")
    assert base.slots == {}  # frozen: the original is not touched
    assert changed.clip_skip == 2
    with pytest.raises(ValueError, match="unknown slot"):
        base.with_slot("unet", SlotChoice())


def test_is_auto() -> None:
    assert Selection().is_auto
    assert Selection(slots={"clip_l": SlotChoice(), "t5xxl": SlotChoice(BUILT_IN)}).is_auto
    assert not Selection(clip_skip=1).is_auto  # explicit 1 on SDXL is not native
    assert not Selection(slots={"clip_l": SlotChoice("a.safetensors")}).is_auto
    assert not Selection(slots={"t5xxl": SlotChoice(precision="fp32")}).is_auto


def test_signature_is_stable_and_ignores_what_changes_nothing() -> None:
    a = Selection(
        clip_skip=2, scope="clip_g", slots={"clip_l": SlotChoice("x.safetensors"), "clip_g": SlotChoice("y", "fp16")}
    )
    b = Selection(
        clip_skip=2, scope="clip_g", slots={"clip_g": SlotChoice("y", "fp16"), "clip_l": SlotChoice("x.safetensors")}
    )
    assert a.signature() == b.signature()  # slot order does not matter
    assert hash(a.signature()) == hash(b.signature())
    assert a.signature() == Selection(**{**a.__dict__, "slots": {**a.slots, "t5xxl": SlotChoice()}}).signature()
    assert Selection().signature() == Selection(scope="clip_l").signature()  # scope means nothing under Auto
    assert Selection().signature() == Selection(slots={"clip_l": SlotChoice()}).signature()
    assert Selection(clip_skip=2).signature() != Selection(clip_skip=2, scope="clip_l").signature()
    assert Selection(clip_skip=2).signature() != Selection(clip_skip=3).signature()
    assert Selection(clip_skip=2).signature() != Selection().signature()
    fp16 = Selection(slots={"clip_l": SlotChoice("x", "fp16")})
    assert fp16.signature() != Selection(slots={"clip_l": SlotChoice("x")}).signature()
    assert fp16.signature() != Selection(slots={"clip_g": SlotChoice("x", "fp16")}).signature()
