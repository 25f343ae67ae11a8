"""core.compute.autocast_off: an explicit precision really computes in that dtype."""

from __future__ import annotations

import pytest
import torch

from te_switch.core.compute import autocast_off


def test_autocast_off_undoes_an_enclosing_cpu_autocast() -> None:
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16  # what a host's autocast would do to an fp32 slot
        with autocast_off(torch.device("cpu")):
            assert (a @ b).dtype == torch.float32
            assert torch.equal(a @ b, torch.mm(a, b))
        assert (a @ b).dtype == torch.bfloat16  # the host's context is back afterwards


@pytest.mark.parametrize("device", [None, "cpu", "meta", torch.device("cpu")])
def test_autocast_off_accepts_devices_without_autocast(device: object) -> None:
    """A device type torch has no autocast for (or none at all) is skipped, never an error."""
    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast_off(device):
        assert (a @ a).dtype == torch.float32
