#!/usr/bin/env bash
# The test command (README "Tests"): style gates, every Rust test, then the TouchDesigner client's
# tests against the real binaries. Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings

echo "== Rust tests (broker, worker + simulator end to end, CLI, crash)"
cargo build --locked -p tdcomfy
cargo test --locked --workspace

echo "== TouchDesigner client tests (pytest, against tdcomfy up --simulate)"
TDCOMFY_BIN="$target/debug/tdcomfy" python3 -m pytest -q clients/touchdesigner/tests

echo "== Dashboard in Chromium (playwright-core, against tdcomfy up --simulate)"
if [ ! -d clients/dashboard-tests/node_modules ]; then
  (cd clients/dashboard-tests && npm ci --no-audit --no-fund --loglevel=error)
fi
# Screenshots of each step land here (the tests print the folder too).
export SCREENSHOT_DIR="${SCREENSHOT_DIR:-$(cd "$target" && pwd)/dashboard-screenshots}"
(cd clients/dashboard-tests && TDCOMFY_BIN="$(cd "$target" && pwd)/debug/tdcomfy" npm test)
echo "dashboard screenshots: $SCREENSHOT_DIR"
