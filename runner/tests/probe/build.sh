#!/usr/bin/env bash
# Rebuilds runner/tests/fixtures/abort_probe.wasm from this crate (same toolchain choice as
# scripts/build: rustup's wasm32-wasip2 target if installed, else Debian's rustc with build-std).
set -euo pipefail
cd "$(dirname "$0")"
if rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  cargo build --target wasm32-wasip2 --release
else
  RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
  RUSTFLAGS="-C link-self-contained=no -L /usr/lib/wasm32-wasi" \
    /usr/bin/cargo build -Zbuild-std=std,panic_abort --target wasm32-wasip2 --release
fi
cp target/wasm32-wasip2/release/abort_probe.wasm ../fixtures/abort_probe.wasm
ls -l ../fixtures/abort_probe.wasm
