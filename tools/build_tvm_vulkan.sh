#!/usr/bin/env bash
# Build Apache TVM with the Vulkan (SPIR-V) codegen and LLVM into a cache outside the checkout, with a venv of its
# own that sees this machine's packages (torch, transformers, this project) but imports the built TVM and its
# matching tvm_ffi first. The PyPI apache-tvm stays the TVM for llvm / cuda / metal / webgpu.
#
#   tools/build_tvm_vulkan.sh                 # source: git clone of apache/tvm at $TVM_COMMIT (+ submodules)
#   TVM_SOURCE=../shared/vendor/apache-tvm-src-5d4dc87.tar.gz tools/build_tvm_vulkan.sh
#       (a tarball without 3rdparty/tvm-ffi also needs TVM_FFI_SOURCE=…/apache-tvm-ffi-src-*.tar.gz; a sibling
#        apache-tvm-ffi-src-*.tar.gz next to the TVM tarball is picked up by itself)
#
# Settings (environment): TVM_VULKAN_CACHE (default ~/.cache/omniquant-mlc/tvm-vulkan), JOBS (default nproc),
# LLVM_CONFIG (default llvm-config-19). The build folder is keyed by the source (commit or tarball sha256), so a
# second call with the same source only re-checks it (seconds); an interrupted build resumes where ninja stopped.
# At the end, $TVM_VULKAN_CACHE/python is a link to the venv's python; `omniquant` finds it there (or through
# OMNIQUANT_TVM_VULKAN_PYTHON) for --target vulkan.
set -euo pipefail

TVM_COMMIT=${TVM_COMMIT:-5d4dc87}
TVM_REPO=${TVM_REPO:-https://github.com/apache/tvm}
CACHE=${TVM_VULKAN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/omniquant-mlc/tvm-vulkan}
JOBS=${JOBS:-$(nproc)}
LLVM_CONFIG=${LLVM_CONFIG:-llvm-config-19}
PY=${PYTHON:-python3}
DEBS="libvulkan-dev libzstd-dev zlib1g-dev libxml2-dev libedit-dev spirv-headers spirv-tools glslang-tools llvm-19-dev libpolly-19-dev mesa-vulkan-drivers vulkan-tools"

say() { printf '[tvm-vulkan] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

# 1. Debian packages: install when we can (root + apt), otherwise name them.
missing=$(for p in $DEBS; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian packages: $(echo $missing)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    die "missing Debian packages: $(echo $missing) (sudo apt-get install $(echo $missing))"
  fi
fi
command -v "$LLVM_CONFIG" >/dev/null || die "$LLVM_CONFIG not found (llvm-19-dev; or set LLVM_CONFIG)"

# 2. The source, keyed so that another source never reuses this build.
if [ -n "${TVM_SOURCE:-}" ]; then
  [ -e "$TVM_SOURCE" ] || die "TVM_SOURCE=$TVM_SOURCE does not exist"
  TVM_SOURCE=$(realpath "$TVM_SOURCE")
  if [ -f "$TVM_SOURCE" ]; then key=src-$(sha256sum "$TVM_SOURCE" | cut -c1-16); else key=dir-$(echo "$TVM_SOURCE" | sha256sum | cut -c1-16); fi
else
  key=git-$TVM_COMMIT
fi
ROOT=$CACHE/$key
SRC=$ROOT/src
BUILD=$SRC/build          # <worktree>/build/lib is where tvm.libinfo looks in a source layout
VENV=$ROOT/venv
mkdir -p "$ROOT"
exec 9>"$ROOT/.lock"
flock -n 9 || die "another build holds $ROOT/.lock"

if [ ! -f "$SRC/.unpacked" ]; then
  rm -rf "$SRC.tmp" && mkdir -p "$SRC.tmp"
  if [ -z "${TVM_SOURCE:-}" ]; then
    say "cloning $TVM_REPO at $TVM_COMMIT"
    git clone -q "$TVM_REPO" "$SRC.tmp" || die "git clone $TVM_REPO failed (offline? set TVM_SOURCE to a source tarball)"
    git -C "$SRC.tmp" checkout -q "$TVM_COMMIT"
    git -C "$SRC.tmp" submodule update -q --init --recursive 3rdparty/tvm-ffi
  elif [ -f "$TVM_SOURCE" ]; then
    say "unpacking $TVM_SOURCE"
    tar xzf "$TVM_SOURCE" -C "$SRC.tmp"
  else
    cp -a "$TVM_SOURCE/." "$SRC.tmp/"
  fi
  [ -f "$SRC.tmp/CMakeLists.txt" ] || die "$TVM_SOURCE: no CMakeLists.txt at its top (not a TVM source tree)"
  if [ ! -f "$SRC.tmp/3rdparty/tvm-ffi/CMakeLists.txt" ]; then
    ffi=${TVM_FFI_SOURCE:-}
    if [ -z "$ffi" ] && [ -f "${TVM_SOURCE:-}" ]; then
      ffi=$(ls "$(dirname "$TVM_SOURCE")"/apache-tvm-ffi-src-*.tar.gz 2>/dev/null | head -n 1 || true)
    fi
    [ -n "$ffi" ] && [ -f "$ffi" ] || die "the TVM source has no 3rdparty/tvm-ffi: set TVM_FFI_SOURCE to its tarball"
    say "unpacking tvm-ffi from $ffi"
    mkdir -p "$SRC.tmp/3rdparty/tvm-ffi"
    tar xzf "$ffi" -C "$SRC.tmp/3rdparty/tvm-ffi"
  fi
  dl=$SRC.tmp/3rdparty/tvm-ffi/3rdparty/dlpack
  if [ ! -f "$dl/include/dlpack/dlpack.h" ]; then
    # tarballs without submodules: take DLPack's headers from the installed PyPI tvm_ffi (same DLPack 1.x ABI)
    inc=$("$PY" -c "import tvm_ffi, pathlib; print(next(pathlib.Path(tvm_ffi.__file__).parent.rglob('dlpack.h')).parent)" 2>/dev/null) \
      || die "3rdparty/dlpack is empty and no installed tvm_ffi provides dlpack.h (pip install apache-tvm-ffi)"
    mkdir -p "$dl/include/dlpack" && cp "$inc"/*.h "$dl/include/dlpack/"
  fi
  touch "$SRC.tmp/.unpacked"
  rm -rf "$SRC" && mv "$SRC.tmp" "$SRC"
fi

# 3. A venv of its own, on top of this machine's packages; CMake >= 3.26 and ninja from PyPI.
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install -q "cmake>=3.26,<4.2" ninja
export PATH=$VENV/bin:$PATH

# 4. Configure once, then ninja (resumes an interrupted build).
if [ ! -f "$BUILD/build.ninja" ]; then
  say "configuring (USE_VULKAN=ON, USE_LLVM=$LLVM_CONFIG static, USE_CUDA=OFF)"
  cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DUSE_VULKAN=ON -DUSE_LLVM="$LLVM_CONFIG --ignore-libllvm --link-static" -DUSE_CUDA=OFF \
    -DTVM_FFI_USE_LIBBACKTRACE=OFF -DUSE_Z3=OFF >"$ROOT/configure.log" 2>&1 \
    || { tail -n 30 "$ROOT/configure.log" >&2; die "cmake configure failed (log: $ROOT/configure.log)"; }
fi
say "building with $JOBS jobs in $BUILD (hours on 2 cores the first time; log: $ROOT/build.log)"
start=$(date +%s)
nice -n 10 ninja -C "$BUILD" -j "$JOBS" >"$ROOT/build.log" 2>&1 \
  || { tail -n 30 "$ROOT/build.log" >&2; die "ninja failed (log: $ROOT/build.log); run again to resume"; }
echo "$(( $(date +%s) - start ))" >>"$ROOT/build-seconds.log"

# 5. Python: tvm_ffi built from the same source, TVM's python/ on the path (a .pth in the venv).
if ! "$VENV/bin/python" -c "import tvm_ffi, sys; sys.exit(0 if tvm_ffi.__file__.startswith('$VENV') or tvm_ffi.__file__.startswith('$SRC') else 1)" 2>/dev/null; then
  say "installing tvm_ffi from $SRC/3rdparty/tvm-ffi into the venv"
  # Its version comes from git (setuptools-scm); a tarball has no .git, so name the version here: a dev release
  # after the PyPI 0.1.15 that TVM's python accepts (>= 0.1.13.post2), tagged with the source's key.
  git -C "$SRC/3rdparty/tvm-ffi" rev-parse >/dev/null 2>&1 \
    || export SETUPTOOLS_SCM_PRETEND_VERSION_FOR_APACHE_TVM_FFI="0.1.16.dev0+${key//-/.}"
  # libbacktrace is a submodule the tarballs leave out (TVM's own build above has it off too)
  SKBUILD_CMAKE_DEFINE="TVM_FFI_USE_LIBBACKTRACE=OFF" \
  "$VENV/bin/python" -m pip install -q "$SRC/3rdparty/tvm-ffi" >"$ROOT/ffi-install.log" 2>&1 \
    || { tail -n 30 "$ROOT/ffi-install.log" >&2; die "pip install of tvm-ffi failed (log: $ROOT/ffi-install.log)"; }
fi
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$SRC/python" >"$site/tvm_vulkan_src.pth"

# 6. Check: the codegen is there and lavapipe (or any Vulkan device) answers.
"$VENV/bin/python" - <<PY || die "the built TVM does not import or lacks target.build.vulkan"
import tvm
assert tvm.__file__.startswith("$SRC"), tvm.__file__
assert tvm.get_global_func("target.build.vulkan", allow_missing=True) is not None, "no target.build.vulkan"
print("[tvm-vulkan] tvm", tvm.__file__, "with target.build.vulkan")
print("[tvm-vulkan] vulkan device present:", tvm.vulkan(0).exist)
PY
ln -sfn "$VENV/bin/python" "$CACHE/python"
say "done: $CACHE/python (omniquant uses it for --target vulkan / --device vulkan)"
