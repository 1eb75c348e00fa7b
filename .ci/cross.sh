#!/usr/bin/env bash
# Portability checks (see shared spec portability.md for the measurements):
#  * cross-compile for x86_64-pc-windows-gnu with Debian's mingw-w64 and run
#    the whole Rust test suite under Debian's wine;
#  * `cargo check` for aarch64-apple-darwin (no macOS SDK here to link, but it
#    compiles every crate, which catches unix-only and Linux-only calls).
# Installs what it needs (apt packages, rustup targets) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v x86_64-w64-mingw32-gcc >/dev/null || need_apt+=(gcc-mingw-w64-x86-64)
command -v wine >/dev/null || need_apt+=(wine64)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "== apt-get install ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
rustup target add x86_64-pc-windows-gnu aarch64-apple-darwin >/dev/null

# Wine 8.0 lacks ProcessPrng, which Rust's std imports from
# bcryptprimitives.dll: a ten-line stand-in, built here, first on WINEPATH.
dll_dir="$PWD/target/wine-dll"
mkdir -p "$dll_dir"
if [ ! -f "$dll_dir/bcryptprimitives.dll" ]; then
    src=""
    for c in ../shared/tools/wine-bcryptprimitives.c tests/wine/bcryptprimitives.c; do
        [ -f "$c" ] && src="$c" && break
    done
    x86_64-w64-mingw32-gcc -shared -O2 -o "$dll_dir/bcryptprimitives.dll" "$src" -ladvapi32
fi
gcc_dll=$(dirname "$(x86_64-w64-mingw32-gcc -print-libgcc-file-name)")
export WINEPATH="$dll_dir;$gcc_dll;/usr/x86_64-w64-mingw32/lib"
export WINEDEBUG=-all
export WINEPREFIX="${WINEPREFIX:-$PWD/target/wineprefix}"
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER=x86_64-w64-mingw32-gcc
# The runner is given as --config, not as CARGO_TARGET_…_RUNNER: assert_cmd
# reads that variable inside the test and would prefix "wine" to every
# command the (already Windows) test binary spawns.
runner=(--config 'target.x86_64-pc-windows-gnu.runner="wine"')

echo "== cargo check --target aarch64-apple-darwin"
cargo check --locked --all-targets --target aarch64-apple-darwin
echo "== cargo test --target x86_64-pc-windows-gnu (under wine)"
cargo test --locked --no-fail-fast --target x86_64-pc-windows-gnu "${runner[@]}"
