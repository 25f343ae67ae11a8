"""Shared fixtures: reference modules (built once per session), the file catalogue, the demo."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from te_switch.standalone.demo import Demo

sys.path.insert(0, os.path.dirname(__file__))  # tests/ helpers import as plain modules

import filemakers as fm
import refmodels as rm

T5_SMALL_VOCAB = 512
SPARSE_LIMIT = 256 << 20  # without sparse files, skip real-shape fixtures above this logical size


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny encoders: hundreds of small matmuls run ~20-30x slower
    with two threads on a busy two-core box (used by the adapter tests through ``usefixtures``)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def sparse_files(tmp_path_factory: pytest.TempPathFactory) -> bool:
    """Whether the temp filesystem keeps a truncated-up file's holes unallocated."""
    probe = tmp_path_factory.mktemp("sparse") / "probe"
    with open(probe, "wb") as f:
        f.write(b"x")
        f.truncate(64 << 20)
    st = os.stat(probe)
    ok = getattr(st, "st_blocks", None) is not None and st.st_blocks * 512 < (1 << 20)
    probe.unlink()
    return ok


@pytest.fixture
def make_case(tmp_path: Path, sparse_files: bool) -> Callable[[str], Path]:
    """Write the named catalogue file into a fresh folder; skip giant ones where files cannot be sparse."""

    def make(name: str, folder: Path | None = None) -> Path:
        case = fm.CATALOGUE[name]
        target = folder or tmp_path / name
        target.mkdir(parents=True, exist_ok=True)
        path = case.make(target)
        if not sparse_files:
            size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
            if size > SPARSE_LIMIT:
                pytest.skip(f"{name}: real-shape fixture needs sparse files ({size >> 20} MiB logical)")
        return path

    return make


# ---------------------------------------------------------------------------------------------
# small reference encoders with real values (session scope: built once, never mutated by tests)


@pytest.fixture(scope="session")
def ref_clip() -> rm.OpenClipTextTransformer:
    """OpenCLIP-layout text tower, quick_gelu, with a projection (like OpenAI CLIP-L, small)."""
    return rm.make_openclip(64, 2, 4, vocab=rm.SMALL_VOCAB, proj_dim=48, seed=1)


@pytest.fixture(scope="session")
def ref_clip_gelu() -> rm.OpenClipTextTransformer:
    """OpenCLIP bigG/H style: gelu, 3 layers, projection."""
    return rm.make_openclip(64, 3, 4, vocab=rm.SMALL_VOCAB, act="gelu", proj_dim=64, seed=2)


@pytest.fixture(scope="session")
def ref_gmp() -> rm.OpenClipTextTransformer:
    return rm.make_openclip(64, 2, 4, vocab=rm.SMALL_VOCAB, proj_dim=48, gmp=True, seed=3)


@pytest.fixture(scope="session")
def ref_long() -> rm.OpenClipTextTransformer:
    ref = rm.make_openclip(64, 2, 4, vocab=rm.SMALL_VOCAB, context=248, proj_dim=48, long_clip=True, seed=4)
    # pe and pe_res differ everywhere, so taking the wrong rows cannot go unnoticed
    assert not ref.positional_embedding.detach().equal(ref.positional_embedding_res.detach())
    return ref


@pytest.fixture(scope="session")
def hf_clip() -> object:
    """HF CLIPTextModelWithProjection, small."""
    return rm.make_hf_clip(64, 2, 4, vocab=rm.SMALL_VOCAB, proj_dim=48, seed=5)


@pytest.fixture(scope="session")
def hf_clip_noproj() -> object:
    """HF CLIPTextModel (transformers >= 5.6 flat state dict), small."""
    return rm.make_hf_clip(64, 2, 4, vocab=rm.SMALL_VOCAB, seed=6)


@pytest.fixture(scope="session")
def t5_small() -> object:
    return rm.make_t5(64, 128, 3, 4, vocab=T5_SMALL_VOCAB, seed=7)


@pytest.fixture(scope="session")
def umt5_small() -> object:
    # per-block relative bias is what conversion must carry; the 256384 vocabulary that identifies
    # UMT5 is covered by the real-shape detection fixture
    return rm.make_t5(64, 128, 2, 4, vocab=T5_SMALL_VOCAB, umt5=True, seed=8)


@pytest.fixture
def tapped_blocks(monkeypatch: pytest.MonkeyPatch) -> list[torch.nn.Module]:
    """Every block a truncated forward (``core.clip_skip.run_to_layer``) takes its output from."""
    from te_switch.core import clip_skip

    seen: list[torch.nn.Module] = []

    class Recording(clip_skip.LayerTap):
        def __init__(self, block: torch.nn.Module, *, stop: bool) -> None:
            super().__init__(block, stop=stop)
            seen.append(block)

    monkeypatch.setattr(clip_skip, "LayerTap", Recording)
    return seen


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """The standalone demo (a tiny SD1.5 pipeline + demo encoders), built once per test session."""
    from te_switch.standalone import demo
    from te_switch.standalone.tokenizers import bpe_path

    try:
        bpe_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))  # the demo's tokenizer is made from open_clip_torch's vocabulary file
    return demo.ensure_demo(str(tmp_path_factory.getbasetemp() / "te_switch_cache"))
