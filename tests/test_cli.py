"""``python -m te_switch inspect|convert``: what users run on their files, and its exit codes.

Files are as small as detection allows: kinds depend on width/depth/positions only, so the CLIP-L
fixtures have real 768×12 attention but a 32-wide MLP and an 8-token vocabulary (29M weights), and the
T5 fixtures are "T5-base" by width with one block. Sparse data with real values patched into the
tensors a test looks at keeps every full read cheap. Most runs call ``cli.main`` in process; a few go
through ``python -m te_switch`` to check the real entry point (no tracebacks, exit codes).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import filemakers as fm
import pytest
import refmodels as rm
import torch
import torch.nn.functional as F
from safetensors import safe_open

from te_switch.core.longclip import effective_table
from te_switch.standalone import cli

REPO = Path(__file__).resolve().parents[1]
FF = 32  # MLP width of the slim CLIP fixtures
JSON_FIELDS = {"path", "tower", "kind", "layout", "layers", "width", "positions", "vocab", "dtypes", "params", "error"}
T5_CANONICAL = {
    "shared.weight",
    "encoder.final_layer_norm.weight",
    "encoder.block.0.layer.0.SelfAttention.q.weight",
    "encoder.block.0.layer.0.SelfAttention.k.weight",
    "encoder.block.0.layer.0.SelfAttention.v.weight",
    "encoder.block.0.layer.0.SelfAttention.o.weight",
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    "encoder.block.0.layer.0.layer_norm.weight",
    "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
    "encoder.block.0.layer.1.DenseReluDense.wi_1.weight",
    "encoder.block.0.layer.1.DenseReluDense.wo.weight",
    "encoder.block.0.layer.1.layer_norm.weight",
}


# ---------------------------------------------------------------------------------------------
# fixtures


def slim(spec: fm.Spec, width: int = 768) -> fm.Spec:
    """The MLP dimension (4 × width) shrunk to FF: detection and completeness only need self-consistency."""
    return {k: (tuple(FF if d == 4 * width else d for d in shape), dt) for k, (shape, dt) in spec.items()}


def write(path: Path, spec: fm.Spec, values: Mapping[str, torch.Tensor] | None = None) -> Path:
    """A sparse safetensors file; ``values`` are written over their tensors' (zero) bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fm.write_sparse_safetensors(path, spec)
    if values:
        blob = path.read_bytes()[:8]
        (n,) = struct.unpack("<Q", blob)
        with open(path, "r+b") as f:
            f.seek(8)
            header = json.loads(f.read(n))
            for name, tensor in values.items():
                begin, end = header[name]["data_offsets"]
                assert fm.DTYPES[header[name]["dtype"]] == tensor.dtype, name
                data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                assert len(data) == end - begin, name
                f.seek(8 + n + begin)
                f.write(data)
    return path


def rand(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


def slim_clip_l(path: Path, dtype: str = "F16", prefix: str = "") -> Path:
    spec = fm.prefixed(slim(fm.hf_clip_spec(768, 12, vocab=8, dtype=dtype)), prefix)
    return write(path, spec)


def openai_clip_l(path: Path, values: Mapping[str, torch.Tensor] | None = None, **kw: object) -> Path:
    return write(path, slim(fm.openclip_spec(768, 12, vocab=8, **kw)), values)  # type: ignore[arg-type]


def t5_base_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """T5-base by width (768), one block, tiny inner/FF/vocab: every tensor gets real values."""
    gen = torch.Generator().manual_seed(seed)
    spec = fm.t5_spec(768, 64, 1, 4, vocab=32, dtype="F32")
    spec = {k: (((64, 768) if "SelfAttention." in k and k[-8:-7] in "qkv" and "relative" not in k else s), d)
            for k, (s, d) in spec.items()}  # fmt: skip
    spec["encoder.block.0.layer.0.SelfAttention.o.weight"] = ((768, 64), "F32")
    return {k: torch.randn(s, generator=gen) * 0.05 + (1.0 if "norm" in k else 0.0) for k, (s, _) in spec.items()}


def t5_base(path: Path, state: Mapping[str, torch.Tensor] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return fm.save_safetensors(path, state if state is not None else t5_base_state())


def sdxl_slim(path: Path, values: Mapping[str, torch.Tensor] | None = None) -> Path:
    spec = {
        **fm.prefixed(slim(fm.hf_clip_spec(768, 12, vocab=8)), "conditioner.embedders.0.transformer."),
        **fm.prefixed(
            fm.openclip_spec(1280, 32, vocab=8, proj=1280, dtype="F8_E4M3"), "conditioner.embedders.1.model."
        ),
        **fm.unet_spec(),
    }
    return write(path, spec, values)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def run_module(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "te_switch", *argv], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def json_lines(out: str) -> list[dict[str, object]]:
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    for row in rows:
        assert set(row) >= JSON_FIELDS, set(row)
    return rows


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_table_has_one_row_per_tower(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = sdxl_slim(tmp_path / "sd_xl_base.safetensors")
    te = t5_base(tmp_path / "t5base.safetensors")
    rc, out, err = run(capsys, "inspect", "--headers-only", str(ckpt), str(te))
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["file", "tower", "kind", "layout", "layers", "pos", "vocab", "dtypes", "params",
                                "quant", "notes"]  # fmt: skip
    rows = [line.split() for line in lines[1:]]
    assert len(rows) == 3
    assert rows[0][:7] == ["sd_xl_base.safetensors", "clip_l", "clip-l", "hf", "12x768", "77", "8"]
    assert rows[1][:7] == ["sd_xl_base.safetensors", "clip_g", "clip-g", "openclip", "32x1280", "77", "8"]
    assert rows[2][:3] == ["t5base.safetensors", "t5-base", "hf"]  # a bare file has no tower column value


def test_inspect_json_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = sdxl_slim(tmp_path / "sdxl.safetensors")
    rc, out, _ = run(capsys, "inspect", "--json", "--headers-only", str(ckpt))
    assert rc == 0
    rows = json_lines(out)
    assert [
        (r["tower"], r["kind"], r["layout"], r["layers"], r["width"], r["positions"], r["vocab"]) for r in rows
    ] == [
        ("clip_l", "clip-l", "hf", 12, 768, 77, 8),
        ("clip_g", "clip-g", "openclip", 32, 1280, 77, 8),
    ]
    assert rows[0]["dtypes"] == ["F16"]
    assert rows[1]["dtypes"] == ["F8_E4M3"]
    assert all(r["path"] == str(ckpt) for r in rows)
    assert all(r["error"] is None for r in rows)
    clip_l_params = sum(fm.numel(s) for k, (s, _) in slim(fm.hf_clip_spec(768, 12, vocab=8)).items())
    assert rows[0]["params"] == clip_l_params


def test_inspect_folder_lists_every_file_and_fails_on_a_bad_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "encoders"
    good = [t5_base(folder / "a.safetensors"), t5_base(folder / "sub" / "b.safetensors", t5_base_state(1))]
    (folder / "notes.txt").write_text("ignored")
    rc, out, err = run(capsys, "inspect", "--json", str(folder))
    assert rc == 0, err
    assert sorted(r["path"] for r in json_lines(out)) == sorted(map(str, good))

    bad = folder / "sub" / "broken.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    rc, out, _ = run(capsys, "inspect", "--json", str(folder))
    assert rc != 0
    rows = {r["path"]: r for r in json_lines(out)}
    assert set(rows) == {*map(str, good), str(bad)}
    assert rows[str(bad)]["error"]
    assert all(rows[str(p)]["error"] is None for p in good)


def test_inspect_exit_codes_and_one_line_errors_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = t5_base(tmp_path / "good.safetensors")
    truncated = t5_base(tmp_path / "truncated.safetensors", t5_base_state(2))
    os.truncate(truncated, os.path.getsize(truncated) - 1000)
    rc, out, err = run(capsys, "inspect", str(good))  # values read too: every weight is finite
    assert rc == 0, err
    assert "t5-base" in out
    bad = run_module("inspect", str(good), str(truncated), str(tmp_path / "missing.safetensors"))
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr
    assert "Traceback" not in bad.stdout
    rows = [line for line in bad.stdout.splitlines() if line.startswith(("truncated", "missing"))]
    assert len(rows) == 2  # each error stays on its own row
    assert "truncated" in rows[0].split("  ", 1)[1]
    assert "no such file" in rows[1]


def test_headers_only_skips_the_value_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = t5_base_state(3)
    state["encoder.block.0.layer.1.DenseReluDense.wo.weight"][2, 3] = float("nan")
    path = t5_base(tmp_path / "nan.safetensors", state)
    rc, out, _ = run(capsys, "inspect", "--json", "--headers-only", str(path))
    assert rc == 0
    assert json_lines(out)[0]["error"] is None
    rc, out, _ = run(capsys, "inspect", "--json", str(path))
    assert rc != 0
    error = json_lines(out)[0]["error"]
    assert "NaN" in error
    assert "DenseReluDense.wo.weight" in error
    assert "\n" not in error


# ---------------------------------------------------------------------------------------------
# convert


def canonical_clip_names(layers: int = 12) -> set[str]:
    return set(fm.canonical_clip_spec(768, layers))


def test_convert_openai_layout_to_canonical_names_transformers_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    in_proj = rand((3 * 768, 768), 1)
    src = openai_clip_l(tmp_path / "ViT-L-14.safetensors", {"transformer.resblocks.3.attn.in_proj_weight": in_proj})
    out = tmp_path / "out" / "clip_l.safetensors"
    out.parent.mkdir()
    rc, stdout, err = run(capsys, "convert", str(src), str(out))
    assert rc == 0, err
    assert "clip-l" in stdout
    tensors, meta = read(out)
    assert set(tensors) == canonical_clip_names()
    assert {t.dtype for t in tensors.values()} == {torch.float16}  # as stored
    q, k, v = in_proj.chunk(3)
    layer = "text_model.encoder.layers.3.self_attn."
    assert torch.equal(tensors[layer + "q_proj.weight"], q)
    assert torch.equal(tensors[layer + "k_proj.weight"], k)
    assert torch.equal(tensors[layer + "v_proj.weight"], v)
    assert meta["te_switch.kind"] == "clip-l"
    from transformers import CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(rm.hf_clip_config(768, 12, 12, vocab=8, intermediate=FF))
    with warnings.catch_warnings():  # copying into meta tensors is a no-op: only names and shapes are checked
        warnings.simplefilter("ignore", UserWarning)
        rm.load_canonical_into_hf(model, tensors)  # strict: every name and shape fits transformers


def test_convert_refuses_to_overwrite_its_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = t5_base(tmp_path / "enc" / "t5.safetensors")
    before = digest(src)
    os.symlink(src, tmp_path / "alias.safetensors")
    for target in (src, tmp_path / "enc" / ".." / "enc" / "t5.safetensors", tmp_path / "alias.safetensors"):
        for extra in ([], ["--overwrite"]):
            rc, _, err = run(capsys, "convert", str(src), str(target), *extra)
            assert rc != 0, (target, extra)
            assert "refusing to overwrite the input" in err
    os.link(src, tmp_path / "hardlink.safetensors")
    rc, _, err = run(capsys, "convert", str(src), str(tmp_path / "hardlink.safetensors"), "--overwrite")
    assert rc != 0
    assert digest(src) == before


def test_convert_refuses_an_existing_output_without_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = t5_base(tmp_path / "t5.safetensors")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    rc, _, err = run(capsys, "convert", str(src), str(out))
    assert rc != 0
    assert "already exists" in err
    assert "--overwrite" in err
    assert out.read_bytes() == b"keep me"
    rc, _, err = run(capsys, "convert", str(src), str(out), "--overwrite")
    assert rc == 0, err
    assert set(read(out)[0]) == T5_CANONICAL
    assert not list(tmp_path.glob("*.tmp-*"))


def test_convert_picks_a_tower_of_a_whole_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    q = rand((768, 768), 2)
    ckpt = sdxl_slim(
        tmp_path / "sdxl.safetensors",
        {"conditioner.embedders.0.transformer.text_model.encoder.layers.5.self_attn.q_proj.weight": q},
    )
    out = tmp_path / "clip_l.safetensors"
    rc, _, err = run(capsys, "convert", str(ckpt), str(out))
    assert rc != 0
    assert "clip_l" in err
    assert "clip_g" in err
    assert "--tower" in err
    assert not out.exists()

    rc, _, err = run(capsys, "convert", str(ckpt), str(out), "--tower", "clip_l")
    assert rc == 0, err
    tensors, meta = read(out)
    assert set(tensors) == canonical_clip_names()
    assert torch.equal(tensors["text_model.encoder.layers.5.self_attn.q_proj.weight"], q)
    assert meta["te_switch.kind"] == "clip-l"

    rc, _, err = run(capsys, "convert", str(ckpt), str(tmp_path / "t5.safetensors"), "--tower", "t5xxl")
    assert rc != 0
    assert "t5xxl" in err


@pytest.mark.parametrize(
    ("flag", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]
)
def test_convert_dtype_casts(tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, dtype: torch.dtype) -> None:
    state = t5_base_state(4)
    src = t5_base(tmp_path / "t5.safetensors", state)
    out = tmp_path / "out.safetensors"
    rc, _, err = run(capsys, "convert", str(src), str(out), "--dtype", flag)
    assert rc == 0, err
    tensors, _ = read(out)
    assert set(tensors) == T5_CANONICAL
    for key, value in tensors.items():
        assert value.dtype == dtype, key
        assert torch.equal(value, state[key].to(dtype)), key


def test_convert_gguf_to_a_normal_fp16_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gguf")
    from synth_gguf import hf_t5_to_llama_names, write_gguf

    state = t5_base_state(5)
    named = hf_t5_to_llama_names(state)
    src = tmp_path / "t5-base-Q8_0.gguf"
    held = write_gguf(src, named, {k: "Q8_0" for k, v in named.items() if v.ndim == 2 and v.shape[-1] % 32 == 0})
    out = tmp_path / "t5.safetensors"
    rc, _, err = run(capsys, "convert", str(src), str(out))
    assert rc == 0, err
    tensors, _ = read(out)
    assert set(tensors) == T5_CANONICAL
    llama = {id(v): k for k, v in named.items()}  # the renaming keeps the tensor objects
    for key, value in tensors.items():
        assert value.dtype == torch.float16, key
        assert torch.equal(value, held[llama[id(state[key])]].half()), key


def test_convert_scaled_fp8_to_a_normal_fp16_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stored, dense = fm.scaled_fp8_state(t5_base_state(6))
    src = fm.save_safetensors(tmp_path / "t5_fp8_e4m3fn_scaled.safetensors", stored)
    out = tmp_path / "t5.safetensors"
    rc, _, err = run(capsys, "convert", str(src), str(out))
    assert rc == 0, err
    tensors, _ = read(out)
    assert set(tensors) == T5_CANONICAL  # no scale_weight, no scaled_fp8 marker
    for key, value in tensors.items():
        assert value.dtype == torch.float16, key
        assert torch.equal(value, dense[key].half()), key


def test_convert_gmp_checkpoint_folds_theta_and_r(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    theta = rand((FF, 768), 7, torch.float32)
    r = rand((FF, 1), 8, torch.float32).abs() + 0.5
    values = {"transformer.resblocks.0.mlp.c_fc.theta": theta, "transformer.resblocks.0.mlp.c_fc.r": r}
    src = openai_clip_l(tmp_path / "clip_ft_10_dict_as-gmp.safetensors", values, gmp=True, dtype="F32")
    out = tmp_path / "clip_l.safetensors"
    rc, _, err = run(capsys, "convert", str(src), str(out))
    assert rc == 0, err
    tensors, _ = read(out)
    assert set(tensors) == canonical_clip_names()
    want = r * F.normalize(theta, p=2, dim=1)  # zer0int's GeometricLinear
    assert torch.allclose(tensors["text_model.encoder.layers.0.mlp.fc1.weight"], want, rtol=1e-6, atol=0)


def test_convert_original_long_clip_merges_the_res_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pe = rand((248, 768), 9)
    res = rand((248, 768), 10)
    values = {"positional_embedding": pe, "positional_embedding_res": res}
    src = openai_clip_l(tmp_path / "longclip-L.safetensors", values, context=248, long_res=True)
    out = tmp_path / "long.safetensors"
    rc, _, err = run(capsys, "convert", str(src), str(out))
    assert rc == 0, err
    tensors, meta = read(out)
    assert set(tensors) == set(fm.canonical_clip_spec(768, 12, positions=248))
    table = tensors["text_model.embeddings.position_embedding.weight"]
    assert torch.equal(table[:20], pe[:20])
    assert torch.equal(table[20:], res[20:])
    assert torch.equal(table, effective_table(pe, res))
    assert meta["te_switch.kind"] == "long-clip-l"


def test_convert_refuses_nan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = t5_base_state(11)
    state["encoder.block.0.layer.0.SelfAttention.k.weight"][0, 0] = float("inf")
    src = t5_base(tmp_path / "t5.safetensors", state)
    out = tmp_path / "out.safetensors"
    rc, _, err = run(capsys, "convert", str(src), str(out))
    assert rc != 0
    assert "NaN or Inf" in err
    assert "SelfAttention.k.weight" in err
    assert not out.exists()
    assert not list(tmp_path.glob("*.tmp-*"))


def test_convert_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = t5_base(tmp_path / "t5.safetensors")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(src.read_bytes()[:-500])
    for argv, needle in (
        ([str(truncated), str(tmp_path / "a.safetensors")], "truncated"),
        ([str(tmp_path / "missing.safetensors"), str(tmp_path / "b.safetensors")], "no such file"),
    ):
        rc, _, err = run(capsys, "convert", *argv)
        assert rc != 0, argv
        assert err.startswith("error: ")
        assert err.count("\n") == 1, err
        assert needle in err


def test_convert_into_a_missing_folder_from_the_command_line(tmp_path: Path) -> None:
    src = t5_base(tmp_path / "t5.safetensors")
    proc = run_module("convert", str(src), str(tmp_path / "no-such-dir" / "c.safetensors"))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-300:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
