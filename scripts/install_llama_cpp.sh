#!/usr/bin/env bash
# Build llama.cpp's tools (and its shared library) from the sdist of llama-cpp-python on PyPI, which
# vendors the whole llama.cpp tree at a pinned commit, into a cache outside the repo:
#
#   $HUBTOOL_CACHE/llama.cpp/<version>/   (HUBTOOL_CACHE defaults to ~/.cache/hubtool)
#     build/bin/llama-{perplexity,quantize,imatrix,bench,completion}  the tools (llama-cli with --with-cli)
#     build/bin/libllama.so, libggml*.so                                the shared library
#     build/bin/llama-logits     hubtool's probe (scripts/llama_logits.cpp): logits per position, greedy
#     env                        LLAMA_CPP_BIN, LLAMA_CPP_PY_VERSION (what hubtool verify reads)
#     .complete                  written last: a rerun with it present does nothing
#
# Why this and not node-llama-cpp: one pinned artifact from the PyPI registry hubtool already uses; cmake
# and a C++ compiler are all it needs (no Node toolchain); it gives llama.cpp's own tool names
# (llama-perplexity, llama-quantize, llama-imatrix are not in node-llama-cpp's prebuilt set), and the same
# tree gives the library hubtool's probe links. The ctypes binding of the same sdist (0.3.36) does not
# match its vendored llama.h (llama_context_params differs) and crashes in llama_decode: hence the probe.
# GGML_NATIVE is off (AVX2/FMA/F16C/BMI2 on): -march=native on this VM enables AMX, whose mul_mat
# segfaults here, and a portable build can be cached and reused by CI machines of another CPU.
# Built in place (absolute RPATHs). Takes ~10-15 min on 2 busy cores, once (llama-cli, which pulls in the
# server, adds about as much again: --with-cli).
#
# Usage: scripts/install_llama_cpp.sh [--print-dir] [--with-cli]
#   env: LLAMA_CPP_PY_VERSION, HUBTOOL_CACHE, JOBS, PYTHON
set -euo pipefail

VERSION="${LLAMA_CPP_PY_VERSION:-0.3.36}"
CACHE="${HUBTOOL_CACHE:-$HOME/.cache/hubtool}"
DEST="$CACHE/llama.cpp/$VERSION"
JOBS="${JOBS:-$(nproc)}"
PY="${PYTHON:-python3}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOLS=(llama llama-perplexity llama-quantize llama-imatrix llama-bench llama-completion)
[[ " $* " == *" --with-cli "* ]] && TOOLS+=(llama-cli)

if [[ " $* " == *" --print-dir "* ]]; then
    echo "$DEST"
    exit 0
fi
if [[ -f "$DEST/.complete" ]]; then
    echo "llama.cpp (llama-cpp-python $VERSION) already built in $DEST"
    exit 0
fi
for tool in cmake c++; do
    command -v "$tool" >/dev/null || { echo "install_llama_cpp: '$tool' is required" >&2; exit 2; }
done

if [[ ! -d "$DEST/src" ]]; then
    rm -rf "$DEST"
    mkdir -p "$DEST"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    echo "downloading the llama-cpp-python $VERSION sdist"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
    tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
    mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DEST/src"
    rm -f "$DEST/src/.git"  # a submodule pointer into the sdist's absent .git
fi

echo "configuring llama.cpp in $DEST/build"
generator="Unix Makefiles"
command -v ninja >/dev/null && generator=Ninja
cmake -S "$DEST/src" -B "$DEST/build" -G "$generator" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    >"$DEST/configure.log"

echo "building ${TOOLS[*]} with $JOBS jobs (log: $DEST/build.log)"
cmake --build "$DEST/build" --target "${TOOLS[@]}" -j "$JOBS" >>"$DEST/build.log"

echo "building hubtool's probe llama-logits"
c++ -O2 -std=c++17 -I"$DEST/src/include" -I"$DEST/src/ggml/include" "$HERE/llama_logits.cpp" \
    -L"$DEST/build/bin" -lllama -lggml -lggml-base -Wl,-rpath,"$DEST/build/bin" \
    -o "$DEST/build/bin/llama-logits"

printf 'LLAMA_CPP_BIN=%s\nLLAMA_CPP_PY_VERSION=%s\n' "$DEST/build/bin" "$VERSION" >"$DEST/env"
"$DEST/build/bin/llama-bench" --version >"$DEST/version.txt" 2>&1 || true
touch "$DEST/.complete"
echo "llama.cpp built in $DEST"
