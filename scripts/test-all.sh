#!/usr/bin/env bash
# Every test of the project: the Rust crate's (unit, integration, doc), the Python package's
# and the C ABI's (scripts/test-capi.sh).
#
# The Python tests run in a virtual environment outside the clone, made on first use and reused
# afterwards (torch is a ~5 GB install): $FUSEDOPT_VENV, by default ~/.cache/fusedopt/venv.
# The package is rebuilt from this tree (`pip install ./python`) on every run.
set -euo pipefail
cd "$(dirname "$0")/.."

# The unit, integration and doc tests (the README's code blocks included). The examples are not
# tests: CI's clippy run (--all-targets) compiles them, and building their release binaries here
# too would add minutes.
echo "== Rust: cargo test --release --all-features --lib --tests"
cargo test --release --all-features --lib --tests
echo "== Rust: cargo test --release --all-features --doc"
cargo test --release --all-features --doc

venv="${FUSEDOPT_VENV:-$HOME/.cache/fusedopt/venv}"
if [[ ! -f "$venv/.complete" ]] || ! "$venv/bin/python" -c "import maturin, pytest, numpy, torch" 2>/dev/null; then
    echo "== Python: creating $venv (numpy, pytest, maturin, torch from PyPI; the first time takes minutes)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet "maturin>=1.7,<2" pytest numpy torch
    touch "$venv/.complete"
fi

# maturin's build hook runs the `maturin` executable by name: the venv's.
export PATH="$venv/bin:$PATH"

echo "== Python: pip install ./python"
"$venv/bin/pip" install --quiet --no-build-isolation --force-reinstall --no-deps ./python

echo "== Python: pytest python/tests"
# From the repository root, so that the installed package (not ./python/fusedopt) is imported.
"$venv/bin/python" -m pytest -q python/tests

echo "== C ABI: scripts/test-capi.sh"
bash scripts/test-capi.sh
