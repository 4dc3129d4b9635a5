#!/usr/bin/env bash
# Install lowmem into a virtual environment.
#   bash scripts/install.sh          # runtime only
#   bash scripts/install.sh --dev    # plus test tools and the transformers/peft oracles
# Uses the active virtual environment if there is one ($VIRTUAL_ENV), else creates ./.venv.
# torch: an already-installed torch (CUDA or CPU) is kept. Otherwise torch==2.13.0 is installed
# first, which on the project's CPU machines is the local CPU wheel, so no multi-GB CUDA build is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
if [[ "${1:-}" == "--dev" ]]; then extra="[dev]"; fi

if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  py="$VIRTUAL_ENV/bin/python"
else
  if [[ ! -x .venv/bin/python ]]; then python3 -m venv .venv; fi
  py=".venv/bin/python"
fi

if "$py" -c "import torch" 2>/dev/null; then
  echo "install.sh: keeping the installed torch $("$py" -c 'import torch; print(torch.__version__)')"
else
  "$py" -m pip install --quiet "torch==2.13.0"
fi
"$py" -m pip install --quiet -e ".${extra}"
echo "install.sh: lowmem installed in $("$py" -c 'import sys; print(sys.prefix)')"
