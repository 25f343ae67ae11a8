"""What a newcomer sees from ``python -m te_switch``: one line per mistake, in their own terms, before anything heavy loads.

The light checks run in a subprocess so ``sys.modules`` shows what was imported; the others call the CLI in process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import filemakers as fm
import pytest
import torch
from safetensors import safe_open

from te_switch.standalone import cli, tokenizers

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "gradio")


def python(code: str, *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=120, check=False
    )


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# compare / ui: before the model


@pytest.mark.parametrize("command", ["compare", "ui"])
def test_help_imports_nothing_heavy(command: str) -> None:
    proc = python(
        "import sys\nfrom te_switch.standalone import cli\n"
        f"try:\n    cli.main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])"
    )
    assert proc.returncode == 0, proc.stderr
    assert "--model" in proc.stdout
    assert "HEAVY []" in proc.stdout


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--clip-skip", "13"], "clip skip must be 1..12"),
        (["--clip-skip", "auto,x"], "clip skip must be 1..12"),
        (["--seeds", "1,two"], "--seeds must be whole numbers"),
        (["--steps", "0"], "--steps must be 1 or more"),
        (["--size", "100"], "--size must be a multiple of 8"),
    ],
)
def test_compare_arguments_answer_before_torch_loads(argv: list[str], needle: str) -> None:
    proc = python(
        "import sys\nfrom te_switch.standalone import cli\n"
        f"rc = cli.main(['compare', *{argv!r}])\n"
        f"print('RC', rc, 'HEAVY', [m for m in {HEAVY!r} if m in sys.modules])"
    )
    assert "RC 1 HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert needle in one_error(proc.stderr)


def test_ui_port_is_checked_before_anything_loads() -> None:
    proc = python(
        "import sys\nfrom te_switch.standalone import cli\n"
        "rc = cli.main(['ui', '--port', '70000'])\n"
        f"print('RC', rc, 'HEAVY', [m for m in {HEAVY!r} if m in sys.modules])"
    )
    assert "RC 1 HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert "--port must be 0-65535" in one_error(proc.stderr)


@pytest.mark.parametrize("command", ["compare", "ui"])
def test_a_missing_optional_dependency_says_what_to_install(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None if name == "diffusers" else real(name))
    rc, _, err = run(capsys, command)
    line = one_error(err)
    assert rc == 2
    assert f"{command} needs diffusers" in line
    assert 'pip install -e ".[standalone]"' in line


def _models(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """A wrong ``--model`` of every kind a newcomer tries, and the words that must name it."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my prompts\n" * 50)
    encoder = fm.write_sparse_safetensors(tmp_path / "clip_l.safetensors", fm.hf_clip_spec(768, 12, positions=77))
    return {
        "text": (notes, "not a checkpoint"),
        "hostile": (fm.hostile_pickle(tmp_path / "evil.pt", tmp_path / "pwned"), "code execution"),
        "unet": (fm.write_sparse_safetensors(tmp_path / "unet.safetensors", fm.unet_spec()), "diffusion model"),
        "lora": (fm.write_sparse_safetensors(tmp_path / "lora.safetensors", fm.lora_kohya_spec()), "a LoRA"),
        "encoder": (encoder, "a text-encoder file (clip-l)"),
        "missing": (tmp_path / "nowhere.safetensors", "no such file or folder"),
    }


@pytest.mark.parametrize("case", ["text", "hostile", "unet", "lora", "encoder", "missing"])
def test_a_wrong_model_is_named_for_what_it_is(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "missing_packages", lambda command: [])
    path, words = _models(tmp_path)[case]
    rc, _, err = run(capsys, "compare", "--model", str(path), "--out", str(tmp_path / "g.png"))
    line = one_error(err)
    assert rc == 1
    assert f"--model {path}" in line
    assert words in line
    assert case == "missing" or "--model takes" in line or "--encoders-dir" in line
    assert not (tmp_path / "pwned").exists()  # the hostile pickle never ran
    assert not (tmp_path / "g.png").exists()


# ---------------------------------------------------------------------------------------------
# the one --no-deps dependency


def test_the_vocabulary_package_is_pinned_in_one_place_and_installed_without_deps(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bpe = tmp_path / tokenizers.BPE_NAME
    bpe.write_bytes(b"")
    installed: list[list[str]] = []

    def fake_bpe_path() -> str:
        if not installed:
            raise FileNotFoundError("not yet")
        return str(bpe)

    def fake_run(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        installed.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(tokenizers, "bpe_path", fake_bpe_path)
    monkeypatch.setattr(tokenizers.subprocess, "run", fake_run)
    assert tokenizers.ensure_bpe() == str(bpe)
    assert len(installed) == 1
    cmd = installed[0]
    assert cmd[:3] == [sys.executable, "-m", "pip"]
    assert "--no-deps" in cmd
    assert "open_clip_torch==3.3.0" in cmd
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "open_clip_torch==3.3.0" in err
    assert tokenizers.ensure_bpe() == str(bpe)  # there now: nothing more is installed
    assert len(installed) == 1
    # the README and the test script lean on that one place: no second pin, no extra pip call
    assert "open_clip" not in (REPO / "tests" / "run.sh").read_text()
    readme_command = (REPO / "README.md").read_text().split("```bash", 1)[1].split("```", 1)[0]
    assert "open_clip" not in readme_command
    assert readme_command.count("pip install") == 1


def test_a_failed_vocabulary_install_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for open_clip_torch\n")

    monkeypatch.setattr(tokenizers, "bpe_path", lambda: (_ for _ in ()).throw(FileNotFoundError("missing")))
    monkeypatch.setattr(tokenizers.subprocess, "run", fail)
    with pytest.raises(FileNotFoundError, match=r"could not install open_clip_torch==3\.3\.0 .*pip install --no-deps"):
        tokenizers.ensure_bpe()


# ---------------------------------------------------------------------------------------------
# convert


def test_convert_says_no_temporary_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = fm.save_safetensors(tmp_path / "clip.safetensors", {"text_model.final_layer_norm.weight": torch.ones(4)})
    (tmp_path / "adir").mkdir()
    for out, words in (("nodir/c.safetensors", "does not exist"), ("adir", "is a folder")):
        rc, _, err = run(capsys, "convert", str(src), str(tmp_path / out))
        line = one_error(err)
        assert rc == 2
        assert str(tmp_path / out) in line
        assert words in line
        assert ".tmp" not in line


def test_save_failure_names_the_output_not_the_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from te_switch.core import convert
    from te_switch.core.errors import TESwitchError

    def broken(tensors: object, path: str, metadata: object = None) -> None:
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(TESwitchError) as e:
        convert.save_canonical(out, {"a": torch.ones(2)})
    assert str(e.value) == f"{out}: cannot write (No space left on device)"
    assert os.listdir(tmp_path) == []


def _sdxl_bundle(path: Path) -> Path:
    spec = {
        **fm.prefixed(fm.hf_clip_spec(768, 12, positions=77), "conditioner.embedders.0.transformer."),
        **fm.prefixed(fm.openclip_spec(1280, 32), "conditioner.embedders.1.model."),
        **fm.unet_spec(),
    }
    return fm.write_sparse_safetensors(path, spec)


def test_convert_a_tower_it_does_not_have_lists_the_ones_it_has(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _sdxl_bundle(tmp_path / "sdxl.safetensors")
    rc, _, err = run(capsys, "convert", str(src), str(tmp_path / "o.safetensors"), "--tower", "banana")
    line = one_error(err)
    assert rc == 2
    assert "no tower 'banana'" in line
    assert "clip_l (clip-l)" in line
    assert "clip_g (clip-g)" in line


def test_convert_dtype_help_says_what_compressed_files_become(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "fp8, scaled-fp8 and GGUF files are written as fp16" in text


def test_convert_a_gguf_t5_whose_size_has_no_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gguf")
    from synth_gguf import hf_t5_to_llama_names, write_gguf

    gen = torch.Generator().manual_seed(3)
    spec = fm.t5_spec(1024, 64, 1, 4, vocab=32, dtype="F32")  # d_model 1024: not XXL, XL or base
    spec = {k: (((64, 1024) if "SelfAttention." in k and k[-8:-7] in "qkv" and "relative" not in k else s), d)
            for k, (s, d) in spec.items()}  # fmt: skip
    spec["encoder.block.0.layer.0.SelfAttention.o.weight"] = ((1024, 64), "F32")
    state = {k: torch.randn(s, generator=gen) * 0.05 for k, (s, _) in spec.items()}
    named = hf_t5_to_llama_names(state)
    src = tmp_path / "t5-custom-Q8_0.gguf"
    held = write_gguf(src, named, {k: "Q8_0" for k, v in named.items() if v.ndim == 2 and v.shape[-1] % 32 == 0})
    rc, out, err = run(capsys, "inspect", "--headers-only", str(src))
    assert "d_model 1024" in out
    dst = tmp_path / "t5.safetensors"
    rc, out, err = run(capsys, "convert", str(src), str(dst))
    assert rc == 0, err
    assert "t5 tower" in out
    llama = {id(v): k for k, v in named.items()}
    with safe_open(str(dst), "pt") as f:
        assert set(f.keys()) == set(state)
        for key in f.keys():  # noqa: SIM118 (safe_open is no mapping)
            value = f.get_tensor(key)
            assert value.dtype == torch.float16
            assert torch.equal(value, held[llama[id(state[key])]].half()), key


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_an_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    rc, out, _ = run(capsys, "inspect", str(tmp_path / "empty"))
    assert rc == 1
    assert f"no weight files in {tmp_path / 'empty'}" in out
    assert "not a weights file" not in out


def diffusers_vae_spec() -> fm.Spec:
    return {
        "encoder.conv_in.weight": ((128, 3, 3, 3), "F16"),
        "encoder.down_blocks.0.resnets.0.conv1.weight": ((128, 128, 3, 3), "F16"),
        "encoder.mid_block.attentions.0.to_q.weight": ((512, 512), "F16"),
        "decoder.conv_in.weight": ((512, 4, 3, 3), "F16"),
        "decoder.up_blocks.0.resnets.0.conv1.weight": ((512, 512, 3, 3), "F16"),
        "quant_conv.weight": ((8, 8, 1, 1), "F16"),
        "post_quant_conv.weight": ((4, 4, 1, 1), "F16"),
    }


def test_inspect_a_model_tree_shows_relative_paths_and_names_the_vae(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "model"
    for part, spec in (("unet", fm.diffusers_unet_spec()), ("vae", diffusers_vae_spec())):
        (root / part).mkdir(parents=True)
        fm.write_sparse_safetensors(root / part / "diffusion_pytorch_model.safetensors", spec)
    _, out, _ = run(capsys, "inspect", "--headers-only", str(root))
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"}
    assert "a VAE" in rows["vae/diffusion_pytorch_model.safetensors"]
    assert "diffusion model" in rows["unet/diffusion_pytorch_model.safetensors"]


def test_inspect_a_plain_pickle_prints_no_torch_warning(tmp_path: Path) -> None:
    path = fm.save_pickle(tmp_path / "old.pt", {"text_model.final_layer_norm.weight": torch.ones(4)}, legacy=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "default"}
    proc = subprocess.run(
        [sys.executable, "-m", "te_switch", "inspect", str(path)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert "Warning" not in proc.stderr, proc.stderr
    assert "old.pt" in proc.stdout
