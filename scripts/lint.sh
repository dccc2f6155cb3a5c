#!/usr/bin/env bash
# The lint and type checks CI runs before the tests (.ci/run calls this script): ruff's linter and
# formatter check on the repository, mypy on the package (settings: pyproject.toml). Exits non-zero
# if any of them finds something, after running all three.
#   bash scripts/lint.sh                                  # with the project's .venv
#   PYTHON=/path/to/venv/bin/python bash scripts/lint.sh  # another environment
# mypy keeps its cache outside the repository (MYPY_CACHE_DIR), so a fresh clone on the same
# machine re-checks only what changed (cold: ~1 min of CPU, mostly torch's own types).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export MYPY_CACHE_DIR="${MYPY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lightning_gradsim/mypy}"
failed=()
step() {
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*"
  if "$@"; then echo "== $name: ok ($((SECONDS - start)) s)"; else echo "== $name: FAILED ($((SECONDS - start)) s)"; failed+=("$name"); fi
}
step "ruff check" "$PYTHON" -m ruff check --output-format concise .
step "ruff format" "$PYTHON" -m ruff format --check --output-format concise .
step "mypy" "$PYTHON" -m mypy
if [ ${#failed[@]} -gt 0 ]; then
  echo "lint: failed: ${failed[*]} (ruff format --diff . shows the layout changes; ruff format . && ruff check --fix . fix most of ruff's findings)" >&2
  exit 1
fi
echo "lint: all passed"
