"""What the WebUI loads by itself: install.py, preload.py, metadata.ini, scripts/te_switch.py, the
javascript/style files, and the host choice."""

from __future__ import annotations

import argparse
import configparser
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
from fakes.harness import fake_webui
from test_webui_support import FakeHost, purge_te_switch_webui, use_host, webui  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parent.parent


def load(path: Path, name: str) -> ModuleType:
    """Import a file the way the WebUI does (spec_from_file_location, the file name as module name)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# install.py


def run_install(tmp_path: Path, *, skip_install: bool) -> list[str]:
    """``python install.py`` as the WebUI runs it, with a fake ``launch`` recording pip calls."""
    (tmp_path / "launch.py").write_text(
        textwrap.dedent(f"""
        import argparse, os
        args = argparse.Namespace(skip_install={skip_install})
        def run_pip(command, desc=None):
            with open(os.environ["PIP_LOG"], "a") as f:
                f.write(command + "\\n")
        def is_installed(package):
            return True
    """)
    )
    log = tmp_path / "pip.log"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PIP_LOG": str(log)}
    subprocess.run([sys.executable, str(ROOT / "install.py")], check=True, env=env, cwd=tmp_path, timeout=60)
    return log.read_text().splitlines() if log.exists() else []


def test_install_does_nothing_when_gguf_is_there(tmp_path: Path) -> None:
    assert importlib.metadata.version("gguf")  # this environment has it
    assert run_install(tmp_path, skip_install=False) == []


def test_install_honours_skip_install(tmp_path: Path) -> None:
    assert run_install(tmp_path, skip_install=True) == []


def test_install_installs_gguf_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    install = load(ROOT / "install.py", "te_switch_install_under_test")
    calls: list[str] = []
    launch = ModuleType("launch")
    launch.args = argparse.Namespace(skip_install=False)
    launch.run_pip = lambda command, desc=None: calls.append(command)
    monkeypatch.setitem(sys.modules, "launch", launch)

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    install.main()
    assert calls == ['install "gguf>=0.13"']
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.0")  # too old to read our files
    install.main()
    assert len(calls) == 2
    launch.args.skip_install = True
    install.main()
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------
# preload.py, metadata.ini, javascript, style


def test_preload_adds_the_flags() -> None:
    preload = load(ROOT / "preload.py", "preload.py")
    parser = argparse.ArgumentParser()
    preload.preload(parser)
    args = parser.parse_args(
        ["--te-switch-dir", "~/enc", "--te-switch-dir", "/data/te", "--te-switch-precision", "fp32"]
    )
    assert args.te_switch_dir == [os.path.expanduser("~/enc"), "/data/te"]
    # removed flag: still accepted (an old command line must start the WebUI), hidden, ignored with a note
    assert args.te_switch_precision == "fp32"
    assert "--te-switch-precision" not in parser.format_help()
    again = parser.parse_args([])  # the WebUI may parse more than once: nothing accumulates
    assert again.te_switch_dir is None
    assert again.te_switch_precision is None


def test_metadata_ini() -> None:
    config = configparser.ConfigParser()
    assert config.read(ROOT / "metadata.ini")
    assert config.get("Extension", "Name") == "te-switch"
    assert not [s for s in config.sections() if s.startswith("callbacks/")]


def test_webui_loads_our_javascript_and_css() -> None:
    # A1111/Forge load javascript/*.js of each extension and the extension root's style.css
    assert (ROOT / "javascript" / "te_switch.js").is_file()
    assert (ROOT / "style.css").is_file()
    js = (ROOT / "javascript" / "te_switch.js").read_text()
    for helper in ("onUiLoaded", "onAfterUiUpdate", "onOptionsChanged", "update_token_counter", "gradioApp"):
        assert helper in js


# ---------------------------------------------------------------------------------------------
# scripts/te_switch.py and the package


def test_script_file_registers_everything(webui: dict[str, Path]) -> None:  # noqa: F811
    from modules import patches, processing, script_callbacks, scripts, shared

    host = FakeHost("sd1")
    use_host(host)
    module = load(ROOT / "scripts" / "te_switch.py", "te_switch.py")
    found = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, scripts.Script)]
    assert [c.__name__ for c in found] == ["TESwitchScript"]
    script = found[0]()
    assert script.title() == "CLIP Skip & Text Encoders"
    assert script.show(False) is scripts.AlwaysVisible
    assert script.show(True) is scripts.AlwaysVisible
    assert "te_switch_clip_skip" in shared.opts.data
    categories = {k: len(v) for k, v in script_callbacks.callback_map.items() if v}
    assert categories == {
        "callbacks_model_loaded": 1, "callbacks_infotext_pasted": 1, "callbacks_before_ui": 1,
        "callbacks_app_started": 1, "callbacks_script_unloaded": 1,
    }  # fmt: skip
    assert host.names() == ["install"]
    assert host.resolver is not None
    script_callbacks.model_loaded_callback("model")
    assert host.calls[-1] == ("model_loaded", "model")
    assert patches.original("te_switch.webui.entry", processing.StableDiffusionProcessing, "close") is not None
    script_callbacks.script_unloaded_callback()
    assert host.names()[-1] == "uninstall"
    assert patches.original("te_switch.webui.entry", processing.StableDiffusionProcessing, "close") is None


def test_script_file_is_thin() -> None:
    code = [line for line in (ROOT / "scripts" / "te_switch.py").read_text().splitlines() if line.strip()]
    statements = [
        line for line in code if not line.startswith(('"""', "#")) and line[0] not in " \t" and "=" not in line[:2]
    ]
    assert len([line for line in statements if line.startswith(("from ", "import "))]) <= 3
    assert len(code) < 20


def test_package_imports_without_a_webui() -> None:
    code = textwrap.dedent("""
        import sys
        import te_switch, te_switch.hosts, te_switch.webui.script, te_switch.webui.api, te_switch.webui.entry
        import te_switch.webui.xyz, te_switch.webui.memory, te_switch.webui.ui
        assert te_switch.hosts.detect() is None
        assert te_switch.webui.script.TESwitchScript().title() == "CLIP Skip & Text Encoders"
        import pkgutil, importlib, te_switch.core
        for m in pkgutil.iter_modules(te_switch.core.__path__):
            importlib.import_module("te_switch.core." + m.name)
        bad = [m for m in sys.modules if m == "gradio" or m.startswith(("gradio.", "modules"))]
        assert not bad, bad
    """)
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )


# ---------------------------------------------------------------------------------------------
# which adapter


@pytest.mark.parametrize(
    ("tree", "kind", "cls"), [("a1111", "a1111", "A1111Adapter"), ("forge", "forge", "ForgeAdapter")]
)
def test_host_chosen_by_what_is_importable(tree: str, kind: str, cls: str) -> None:
    import te_switch.hosts as hosts

    purge_te_switch_webui()
    try:
        with fake_webui(tree):
            assert hosts.kind_of_environment() == kind
            adapter = hosts.get_adapter()
            assert type(adapter).__name__ == cls
            assert hosts.get_adapter() is adapter  # one per process
    finally:
        hosts.set_adapter(None)


def test_host_chosen_by_the_live_model() -> None:
    import te_switch.hosts as hosts

    forge_model = type("M", (), {"forge_objects": object()})()
    a1111_model = type("M", (), {"cond_stage_model": object()})()
    fake_initial = type("FakeInitialModel", (), {"cond_stage_model": None})()
    assert hosts.kind_of_model(forge_model) == "forge"
    assert hosts.kind_of_model(a1111_model) == "a1111"
    assert hosts.kind_of_model(fake_initial) is None
    assert hosts.kind_of_model(None) is None
