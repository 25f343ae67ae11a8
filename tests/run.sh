#!/usr/bin/env bash
# The whole test suite from a fresh machine: install what the tests need, run them on this Python's
# stack, then again on the two WebUI stacks in virtual environments that reuse this Python's packages
# (torch...) behind their own pins, whether this Python is a venv or not:
#   a1111: Gradio 3.41.2, transformers 4.30.2, FastAPI 0.94, pydantic 1 (A1111 1.10 and Forge Classic pins)
#   forge: Gradio 4.40.0, transformers 4.46.1, FastAPI 0.104, pydantic 2 (Forge 2 pins)
#   reforge: Gradio 3.41.2, transformers 4.48.1, FastAPI 0.94, pydantic 1 (reForge main pins)
# TE_SWITCH_STACKS=0 skips the two stack runs. Extra arguments go to the first pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
pip_q() { python -m pip install -q --disable-pip-version-check "$@"; }

# torch first, or a dependency pulls the newest CUDA build (gigabytes)
python -c "import torch" 2>/dev/null || pip_q torch==2.13.0
pip_q -e ".[standalone,test]"
python -m te_switch.standalone.tokenizers >/dev/null  # CLIP's BPE vocabulary (the package is pinned there)

python -m pytest -q "$@"

[ "${TE_SWITCH_STACKS:-1}" = "0" ] && exit 0
STACK_TESTS="tests/test_webui_ui.py tests/test_webui_script.py tests/test_webui_api.py tests/test_webui_infotext.py
  tests/test_webui_sources.py tests/test_webui_xyz.py tests/test_webui_recommend.py tests/test_localization.py
  tests/test_engine.py tests/test_host_base.py tests/test_slots.py tests/test_clip_skip.py"
declare -A PINS=(
  [a1111]="gradio==3.41.2 transformers==4.30.2 fastapi==0.94.0 pydantic<2 numpy<2 huggingface_hub<0.26 httpx==0.24.1"
  [forge]="gradio==4.40.0 transformers==4.46.1 fastapi==0.104.1 pydantic==2.8.2 numpy<2 huggingface_hub<0.26 httpx==0.24.1"
  [reforge]="gradio==3.41.2 transformers==4.48.1 fastapi==0.94.0 pydantic<2 numpy<2 huggingface_hub==0.25.0 httpx==0.24.1"
)
declare -A HOST_TESTS=(
  [a1111]="tests/test_a1111_adapter.py tests/test_ldm_forge_adapter.py tests/test_ldm_forge_fakes.py"
  [forge]="tests/test_forge_adapter.py tests/test_forge_fakes.py"
  [reforge]="tests/test_ldm_forge_adapter.py tests/test_ldm_forge_fakes.py"
)
# reForge shares A1111's Gradio 3.41 stack: only what depends on its newer transformers runs again there
declare -A STACK_ONLY=([reforge]="tests/test_slots.py tests/test_clip_skip.py")
# `venv --system-site-packages` made from inside a venv would inherit the *base* interpreter's packages,
# not this one's: a .pth in each stack venv adds this Python's site dirs instead (after the venv's own).
PARENT_SITES=$(python -c 'import site, sysconfig; p = sysconfig.get_paths(); print(sorted({*site.getsitepackages(), p["purelib"], p["platlib"]}))')
for stack in a1111 forge reforge; do
  venv=".cache/stacks/$stack"
  [ -x "$venv/bin/python" ] || python -m venv "$venv"
  site_dir=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # one line of a .pth runs in a scope a 3.11 list comprehension cannot see into: map, not a comprehension
  echo "import site; list(map(site.addsitedir, $PARENT_SITES))" >"$site_dir/te_switch_parent_site.pth"
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install -q --disable-pip-version-check ${PINS[$stack]} 2>&1 | grep -v "dependency\|requires\|WARNING" || true
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps diffusers==0.31.0
  echo "== $stack stack: $("$venv/bin/python" -c 'import gradio, transformers; print("gradio", gradio.__version__, "transformers", transformers.__version__)')"
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pytest -q -p no:cacheprovider ${HOST_TESTS[$stack]} ${STACK_ONLY[$stack]:-$STACK_TESTS}
done
