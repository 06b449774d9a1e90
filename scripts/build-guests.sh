#!/usr/bin/env bash
# Build the guest components in guests/ for wasm32-wasip2 (installing the target if needed),
# then the Python guests in guests/python/ with componentize-py (pinned, in a venv it creates).
# Output: guests/target/wasm32-wasip2/release/*.wasm and guests/target/python/*.wasm
set -euo pipefail
cd "$(dirname "$0")/.."
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  echo "== installing the wasm32-wasip2 target"
  rustup target add wasm32-wasip2
fi
echo "== building guest components"
cargo build --release --target wasm32-wasip2 --manifest-path guests/Cargo.toml
ls -l guests/target/wasm32-wasip2/release/*.wasm

# Python guests. componentize-py generates the bindings of the world (`wit_world`) while it
# builds and bundles CPython and its standard library into the component.
COMPONENTIZE_PY_VERSION=0.25.1
venv=guests/target/py-venv
out=guests/target/python
if [ ! -x "$venv/bin/python" ]; then
  echo "== creating $venv"
  python3 -m venv "$venv" || { echo "python3 -m venv failed (on Debian: apt-get install python3-venv)" >&2; exit 1; }
fi
installed=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("componentize-py"))' 2>/dev/null || true)
if [ "$installed" != "$COMPONENTIZE_PY_VERSION" ]; then
  echo "== installing componentize-py $COMPONENTIZE_PY_VERSION"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$COMPONENTIZE_PY_VERSION"
fi
build_python_guest() { # NAME WORLD: guests/python/NAME/app.py -> $out/NAME_py.wasm
  # Build from a copy: componentize-py's pre-initialisation writes __pycache__ next to the sources.
  local src="$out/src/$1"
  rm -rf "$src" && mkdir -p "$src" && cp "guests/python/$1"/*.py "$src"/
  echo "== building Python guest $1 (world $2)"
  "$venv/bin/componentize-py" -d wit -w "$2" componentize app -p "$src" -o "$out/$1_py.wasm"
}
build_python_guest thermal_analysis compute
build_python_guest turn_monitor behavior
ls -l "$out"/*.wasm
