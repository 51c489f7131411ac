#!/usr/bin/env bash
# Make (or update) the project's virtualenv and install lowgear into it with the given extras.
#   - a CUDA build of torch already installed for this python is reused (venv with system site packages),
#     never replaced;
#   - on a machine with no NVIDIA GPU, the CPU build of torch 2.13.0 is installed, never a multi-GB CUDA build;
#   - on a GPU machine with no torch yet, pip's default (CUDA) build is the right one.
set -euo pipefail
extras="${1:-demo}"
venv="${VENV:-.venv}"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  if "$py" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    echo "bootstrap: reusing the installed CUDA torch ($("$py" -c 'import torch; print(torch.__version__)'))"
    "$py" -m venv --system-site-packages "$venv"
  else
    "$py" -m venv "$venv"
  fi
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" torch
  elif ls /opt/wheels/torch-2.13.0* >/dev/null 2>&1; then
    "${pip[@]}" "torch==2.13.0"          # the CPU build that lies on this machine's disk
  else
    "${pip[@]}" "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${pip[@]}" -e ".[${extras}]"
