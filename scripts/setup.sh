#!/usr/bin/env bash
# Create (or update) the project's virtual environment at .venv with everything tests and examples need.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# constraints.txt: the torch/torchvision versions this project is tested with (not bounds of the package)
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[dev]' 2> >(grep -v "^WARNING: Location" >&2)
.venv/bin/python -c "import lightning_gradsim, torch, lightning; print('lightning_gradsim', lightning_gradsim.__version__, '| torch', torch.__version__, '| lightning', lightning.__version__)"
