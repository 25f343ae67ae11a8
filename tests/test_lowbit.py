"""lowbit: compressed Linear/Embedding weights expanded per forward, and a bit-exact undo.

The oracle for every output is the same module with the *expanded* weight loaded densely: the
expansion is deterministic and the matmul/gather the same, so results must be identical, not close.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from te_switch.core import lowbit
from te_switch.core.tensors import PackedTensor, dense

gguf = pytest.importorskip("gguf")

from synth_gguf import random_blocks  # noqa: E402

IN, OUT, VOCAB = 256, 48, 40  # 256: one K-quant super-block per row


def detach_all(tree: torch.nn.Module) -> int:
    """Detach every attached module under ``tree`` (itself included); returns how many."""
    attached = [m for m in tree.modules() if lowbit.is_attached(m)]
    for m in attached:
        lowbit.detach(m)
    return len(attached)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_weight(kind: str, shape: tuple[int, int], seed: int = 0) -> PackedTensor | torch.Tensor:
    values = torch.randn(shape, generator=gen(seed)) * 0.1
    if kind == "Q8_0":
        raw = gguf.quants.quantize(values.numpy(), gguf.GGMLQuantizationType.Q8_0)
        return PackedTensor("Q8_0", torch.from_numpy(raw), torch.Size(shape))
    if kind in ("Q4_K", "Q6_K"):
        return PackedTensor(kind, torch.from_numpy(random_blocks(kind, shape, seed=seed)), torch.Size(shape))
    if kind == "fp8":
        return values.to(torch.float8_e4m3fn)
    if kind == "fp8-e5m2":
        return values.to(torch.float8_e5m2)
    if kind == "scaled-fp8":
        scale = values.abs().max() / 448
        return PackedTensor("F8_E4M3", (values / scale).to(torch.float8_e4m3fn), torch.Size(shape), scale)
    raise AssertionError(kind)


KINDS = ["Q8_0", "Q4_K", "fp8", "fp8-e5m2", "scaled-fp8"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def snapshot(module: nn.Module) -> dict[str, object]:
    """Everything detach() must restore, down to object identity and tensor bits."""
    return {
        "dict_keys": sorted(module.__dict__),
        "params": [(n, p) for n, p in module.named_parameters()],
        "state": {k: (v.dtype, v.device, v.clone()) for k, v in module.state_dict().items()},
        "buffers": dict(module._buffers),
        "non_persistent": set(module._non_persistent_buffers_set),
        "state_dict_hooks": dict(module._state_dict_hooks),
    }


def assert_restored(module: nn.Module, before: dict[str, object]) -> None:
    after = snapshot(module)
    assert after["dict_keys"] == before["dict_keys"]
    assert [n for n, _ in after["params"]] == [n for n, _ in before["params"]]
    assert all(a is b for (_, a), (_, b) in zip(after["params"], before["params"], strict=True))
    assert after["state"].keys() == before["state"].keys()
    for key, (dtype, device, value) in before["state"].items():
        got_dtype, got_device, got = after["state"][key]
        assert (got_dtype, got_device) == (dtype, device)
        assert torch.equal(got.view(torch.uint8), value.view(torch.uint8)), key  # bits, NaN-safe
    assert after["buffers"] == before["buffers"]
    assert after["non_persistent"] == before["non_persistent"]
    assert after["state_dict_hooks"] == before["state_dict_hooks"]
    assert "forward" not in module.__dict__
    assert "_apply" not in module.__dict__
    assert not lowbit.is_attached(module)


def expanded(weight: PackedTensor | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dense(weight, dtype)  # PackedTensor.dequantize / fp8 .to(dtype): lowbit's own code path is not used


# ---------------------------------------------------------------------------------------------
# Linear


@pytest.mark.parametrize("kind", KINDS)
def test_linear_matches_dense_and_detach_restores(kind: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(IN, OUT)
    before = snapshot(lin)
    original_out = lin(torch.ones(1, IN))
    weight = make_weight(kind, (OUT, IN))
    lowbit.attach(lin, weight)
    assert lowbit.is_attached(lin)
    for dtype in DTYPES:
        x = torch.randn(2, 5, IN, generator=gen(1)).to(dtype)
        want = F.linear(x, expanded(weight, dtype), lin.bias.to(dtype))
        got = lin(x)
        assert got.dtype == dtype
        assert torch.equal(got, want), (kind, dtype)
    lowbit.detach(lin)
    assert_restored(lin, before)
    assert torch.equal(lin(torch.ones(1, IN)), original_out)


def test_linear_with_half_module_and_no_bias() -> None:
    lin = nn.Linear(IN, OUT, bias=False).to(torch.bfloat16)
    weight = make_weight("Q6_K", (OUT, IN))
    before = snapshot(lin)
    lowbit.attach(lin, weight)
    assert lin.weight.dtype == torch.bfloat16  # the previous weight's dtype is the reported compute dtype
    x = torch.randn(3, IN, generator=gen(2), dtype=torch.bfloat16)
    assert torch.equal(lin(x), F.linear(x, expanded(weight, torch.bfloat16)))
    lowbit.detach(lin)
    assert_restored(lin, before)


# ---------------------------------------------------------------------------------------------
# Embedding


@pytest.mark.parametrize("kind", KINDS)
def test_embedding_matches_dense_and_detach_restores(kind: str) -> None:
    emb = nn.Embedding(VOCAB, IN, padding_idx=0)
    before = snapshot(emb)
    weight = make_weight(kind, (VOCAB, IN), seed=3)
    ids = torch.tensor([[0, 5, 5, 39, 1, 0, 17], [3, 3, 3, 3, 3, 3, 3]])
    for dtype in (torch.float16, torch.bfloat16):
        lowbit.attach(emb, weight, dtype=dtype)
        assert (emb.weight.shape, emb.weight.dtype) == (torch.Size((VOCAB, IN)), dtype)
        got = emb(ids)
        assert got.dtype == dtype
        assert got.shape == (2, 7, IN)
        assert torch.equal(got, F.embedding(ids, expanded(weight, dtype), padding_idx=0)), (kind, dtype)
        assert emb(torch.zeros(0, dtype=torch.long)).shape == (0, IN)
        with pytest.raises(IndexError):
            emb(torch.tensor([VOCAB]))
        lowbit.detach(emb)
        assert_restored(emb, before)


def test_embedding_without_row_access_expands_the_table() -> None:
    """A per-row scale is not one scalar: lowbit must fall back to expanding the whole table."""
    values = torch.randn(VOCAB, IN, generator=gen(4))
    scale = values.abs().amax(dim=1, keepdim=True) / 448
    weight = PackedTensor("F8_E4M3", (values / scale).to(torch.float8_e4m3fn), torch.Size((VOCAB, IN)), scale)
    emb = nn.Embedding(VOCAB, IN)
    lowbit.attach(emb, weight)
    ids = torch.tensor([1, 2, 39, 2])
    assert torch.equal(emb(ids), F.embedding(ids, weight.dequantize(torch.float32)))
    lowbit.detach(emb)


# ---------------------------------------------------------------------------------------------
# what an attached module looks like


def test_attached_weight_is_a_free_placeholder_that_follows_the_module() -> None:
    lin = nn.Linear(IN, OUT)
    weight = make_weight("Q8_0", (OUT, IN))
    lowbit.attach(lin, weight)
    w = lin.weight
    assert isinstance(w, nn.Parameter)
    assert w.shape == (OUT, IN)
    assert w.dtype == torch.float32
    assert w.device == lin.bias.device
    assert w.untyped_storage().nbytes() == w.element_size()
    assert torch.isnan(w[0, 0]), "reading values directly must not look like a real weight"
    assert [n for n, _ in lin.named_parameters()] == ["weight", "bias"]
    raw = lin.weight_lowbit_raw
    assert raw.dtype == torch.uint8
    assert raw.data_ptr() == lowbit.packed_weight(lin).raw.data_ptr()

    # dtype conversions retarget the placeholder without materialising it and leave the bytes alone
    for convert, dtype in ((nn.Module.half, torch.float16), (nn.Module.bfloat16, torch.bfloat16)):
        convert(lin)
        assert lin.weight is w
        assert w.dtype == dtype
        assert not any(w.stride())
        assert lin.weight_lowbit_raw is raw
    lin.to(torch.float32)
    x = torch.randn(4, IN, generator=gen(5))
    assert torch.equal(lin(x), F.linear(x, expanded(weight, torch.float32), lin.bias))

    # state_dict() carries real values under the usual keys
    sd = lin.state_dict()
    assert list(sd) == ["weight", "bias"]
    assert torch.equal(sd["weight"], expanded(weight, torch.float32))
    lowbit.detach(lin)


def test_device_moves_carry_the_bytes_and_detach_follows_the_module() -> None:
    """``.to(device)`` moves the compressed bytes and the placeholder; detach restores onto the new device.

    The meta device stands in for a GPU here: it exercises the same device-move path without one.
    """
    lin = nn.Linear(IN, OUT)
    original = lin.weight
    lowbit.attach(lin, make_weight("Q8_0", (OUT, IN)))
    lin.to("meta")
    assert lin.weight.device.type == "meta"
    assert lin.weight_lowbit_raw.device.type == "meta"
    assert lin.weight_lowbit_raw.dtype == torch.uint8
    assert not any(lin.weight.stride())
    assert lin(torch.zeros(2, IN, device="meta")).shape == (2, OUT)
    lowbit.detach(lin)
    assert lin.weight.device.type == "meta"  # where a dense module would be after .to("meta")
    assert lin.weight.shape == original.shape
    assert not lowbit.is_attached(lin)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_and_moves() -> None:
    lin = nn.Linear(IN, OUT).cuda()
    before = snapshot(lin)
    weight = make_weight("Q4_K", (OUT, IN))
    lowbit.attach(lin, weight, offload="cpu")
    assert before["params"][0][1].device.type == "cpu"  # the original waits on the CPU
    assert lin.weight.is_cuda
    assert lin.weight_lowbit_raw.is_cuda
    x = torch.randn(3, IN, device="cuda", dtype=torch.float16)
    assert torch.equal(lin(x), F.linear(x, expanded(weight, torch.float16).cuda(), lin.bias.half()))
    lin.cpu()
    assert lin.weight_lowbit_raw.device.type == "cpu"
    lin.cuda()
    lowbit.detach(lin)
    assert_restored(lin, before)


def test_writes_into_the_placeholder_fail_loudly() -> None:
    lin = nn.Linear(IN, OUT)
    lowbit.attach(lin, make_weight("Q8_0", (OUT, IN)))
    with pytest.raises(RuntimeError), torch.no_grad():
        lin.weight.add_(1.0)  # e.g. LoRA patching weights in place
    with pytest.raises(RuntimeError):
        lin.load_state_dict({"weight": torch.zeros(OUT, IN), "bias": torch.zeros(OUT)})
    lin.weight.data = torch.zeros(OUT, IN)  # a real weight swapped in behind lowbit's back
    with pytest.raises(RuntimeError, match="detach"):
        lin(torch.zeros(1, IN))
    lowbit.detach(lin)


def test_detach_restores_an_earlier_instance_forward() -> None:
    """Hosts hijack modules by assigning instance forwards; lowbit must hand those back."""
    lin = nn.Linear(IN, OUT)
    hijack = lambda x: torch.full((1,), 7.0)  # noqa: E731
    lin.forward = hijack
    before = snapshot(lin)
    lowbit.attach(lin, make_weight("fp8", (OUT, IN)))
    assert lin.forward is not hijack
    lowbit.detach(lin)
    assert lin.__dict__["forward"] is hijack
    assert sorted(lin.__dict__) == before["dict_keys"]


def test_reattach_swaps_the_weight_and_keeps_the_original() -> None:
    lin = nn.Linear(IN, OUT)
    before = snapshot(lin)
    first, second = make_weight("Q8_0", (OUT, IN)), make_weight("scaled-fp8", (OUT, IN), seed=9)
    lowbit.attach(lin, first)
    lowbit.attach(lin, second)
    x = torch.randn(2, IN, generator=gen(6))
    assert torch.equal(lin(x), F.linear(x, expanded(second, torch.float32), lin.bias))
    assert lowbit.compressed_bytes(lin) == second.nbytes
    lowbit.detach(lin)
    assert_restored(lin, before)
    lowbit.detach(lin)  # no-op when not attached


def test_compressed_bytes_of_a_tree() -> None:
    tree = nn.Sequential(nn.Embedding(VOCAB, IN), nn.Linear(IN, OUT), nn.Linear(IN, OUT), nn.LayerNorm(OUT))
    weights = [make_weight("Q8_0", (VOCAB, IN)), make_weight("Q4_K", (OUT, IN)), make_weight("scaled-fp8", (OUT, IN))]
    for module, weight in zip(tree[:3], weights, strict=True):
        lowbit.attach(module, weight)
    packed = sum(w.nbytes for w in weights)
    assert lowbit.compressed_bytes(tree) == packed
    assert lowbit.dense_bytes(tree) == (VOCAB * IN + 2 * OUT * IN) * 4
    assert lowbit.compressed_bytes(tree) < lowbit.dense_bytes(tree) / 3
    assert detach_all(tree) == 3
    assert lowbit.compressed_bytes(tree) == 0
    assert lowbit.dense_bytes(tree) == 0


def test_attach_rejects_what_it_cannot_do() -> None:
    lin = nn.Linear(IN, OUT)
    with pytest.raises(TypeError, match="not a compressed weight"):
        lowbit.attach(lin, torch.zeros(OUT, IN, dtype=torch.float16))
    with pytest.raises(ValueError, match="does not match"):
        lowbit.attach(lin, make_weight("Q8_0", (OUT + 1, IN)))
    with pytest.raises(ValueError, match="kind="):
        lowbit.attach(nn.LayerNorm(IN), make_weight("fp8", (IN, IN)))
    with pytest.raises(ValueError, match="max_norm"):
        lowbit.attach(nn.Embedding(VOCAB, IN, max_norm=1.0), make_weight("fp8", (VOCAB, IN)))
    with pytest.raises(ValueError, match="no decoder"):
        lowbit.attach(lin, PackedTensor("Q9_9", torch.zeros(1, dtype=torch.uint8), torch.Size((OUT, IN))))
    fp8_module = nn.Linear(IN, OUT).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="dtype="):
        lowbit.attach(fp8_module, make_weight("fp8", (OUT, IN)))
    assert not lowbit.is_attached(lin)
    assert not lowbit.is_attached(fp8_module)


def test_duck_typed_module_with_kind() -> None:
    class Projection(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(OUT, IN))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.weight)

    proj = Projection()
    weight = make_weight("Q4_K", (OUT, IN))
    lowbit.attach(proj, weight, kind="linear")
    x = torch.randn(2, IN, generator=gen(7))
    assert torch.equal(proj(x), F.linear(x, expanded(weight, torch.float32)))
    lowbit.detach(proj)
    assert torch.equal(proj(x), torch.zeros(2, OUT))


# ---------------------------------------------------------------------------------------------
# a real host model


def test_t5_encoder_with_compressed_weights_matches_dense(t5_small) -> None:
    """transformers' T5 reads wo.weight.dtype and uses the shared embedding: all must still hold."""
    model = copy.deepcopy(t5_small)
    dense_model = copy.deepcopy(t5_small)
    ids = torch.tensor([[5, 17, 3, 99, 1, 0, 0]])
    original = model(input_ids=ids).last_hidden_state
    before = {k: v.clone() for k, v in model.state_dict().items()}

    targets = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    dense_modules = dict(dense_model.named_modules())
    for name, module in targets.items():
        values = module.weight.detach()
        if values.shape[-1] % 32 == 0:
            raw = torch.from_numpy(gguf.quants.quantize(values.numpy(), gguf.GGMLQuantizationType.Q8_0))
            packed: PackedTensor | torch.Tensor = PackedTensor("Q8_0", raw, values.shape)
        else:  # the (32 buckets x 4 heads) relative attention bias: too narrow for blocks
            packed = values.to(torch.float8_e4m3fn)
        lowbit.attach(module, packed)
        with torch.no_grad():
            dense_modules[name].weight.copy_(expanded(packed, torch.float32))
    assert lowbit.compressed_bytes(model) < lowbit.dense_bytes(model) / 3

    with torch.no_grad():
        got = model(input_ids=ids).last_hidden_state
        want = dense_model(input_ids=ids).last_hidden_state
    assert torch.equal(got, want)
    assert not torch.equal(got, original)  # the quantised weights really were used

    assert detach_all(model) == len(targets)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(model(input_ids=ids).last_hidden_state, original)
