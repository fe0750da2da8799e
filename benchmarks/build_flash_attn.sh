#!/usr/bin/env bash
# Build the flash-attn package (2.8.3) from its source distribution, trimmed for swaa's GPU tests: sm_90 only,
# head dims 64 and 128 only (any other head dim is refused by the kernel dispatch, never run wrongly), no
# dropout, ALiBi, soft-capping or uneven head dims. About 4 minutes on 16 cores (a 25.6 MB extension), where
# the full build takes over an hour. The package is built in place, not installed: put the printed folder on
# PYTHONPATH.
#
#   bash benchmarks/build_flash_attn.sh [SOURCE] [DEST]
#     SOURCE  the sdist flash_attn-2.8.3.tar.gz, its unpacked folder (pristine or already trimmed), or a folder
#             holding either (default: .fa)
#     DEST    where the trimmed tree is unpacked and built (default: build/flash-attn); a built tree is reused
#   TRIM_ONLY=1 stops after trimming (no CUDA needed).
#
# Fetch the sdist once, on a machine with network and torch installed:
#   FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE pip download --no-deps --no-build-isolation --no-binary :all: \
#       flash-attn==2.8.3 -d .fa
set -euo pipefail
SOURCE=${1:-.fa}
DEST=${2:-build/flash-attn}

if [ -d "$SOURCE" ] && [ ! -f "$SOURCE/setup.py" ]; then  # a folder holding the sdist or its tree
    found=$(find "$SOURCE" -maxdepth 2 \( -name 'flash_attn-*.tar.gz' -o -name setup.py \) | sort | head -1)
    [ -n "$found" ] || { echo "no flash_attn-*.tar.gz or setup.py under $SOURCE" >&2; exit 1; }
    [ "$(basename "$found")" = setup.py ] && SOURCE=$(dirname "$found") || SOURCE=$found
fi
if [ ! -f "$DEST/setup.py" ]; then
    mkdir -p "$DEST"
    if [ -d "$SOURCE" ]; then cp -a "$SOURCE/." "$DEST/"; else tar xzf "$SOURCE" -C "$DEST" --strip-components=1; fi
fi

python3 - "$DEST" <<'EOF'
"""Trim the tree in place; running it again changes nothing."""
import pathlib
import re
import shutil
import sys

root = pathlib.Path(sys.argv[1])
HEAD_DIMS = {"64", "128"}
FLAGS = ["DROPOUT", "ALIBI", "SOFTCAP", "UNEVEN_K"]
for folder in ["csrc/composable_kernel", "csrc/flash_attn_ck", "flash_attn/flash_attn_triton_amd", "hopper", "tests"]:
    shutil.rmtree(root / folder, ignore_errors=True)  # AMD kernels, FlashAttention-3, flash-attn's own tests
for child in (root / "csrc/cutlass").iterdir():  # cutlass is used through its headers only
    if child.name != "include":
        shutil.rmtree(child) if child.is_dir() else child.unlink()
for kernel in (root / "csrc/flash_attn/src").glob("*_hdim*.cu"):
    if re.search(r"hdim(\d+)", kernel.name)[1] not in HEAD_DIMS:
        kernel.unlink()

setup = root / "setup.py"
lines = setup.read_text().splitlines(keepends=True)
lines = [line for line in lines if (m := re.search(r'"csrc/flash_attn/src/\w*hdim(\d+)', line)) is None
         or m[1] in HEAD_DIMS]
text = "".join(lines)
for flag in FLAGS:
    text = text.replace(f'# "-DFLASHATTENTION_DISABLE_{flag}"', f'"-DFLASHATTENTION_DISABLE_{flag}"')
setup.write_text(text)
missing = [source for source in re.findall(r'"(csrc/flash_attn/[\w/]+\.(?:cu|cpp))"', text)
           if not (root / source).exists()]
assert not missing, f"setup.py lists sources that are gone: {missing}"
assert all(f'\n    "-DFLASHATTENTION_DISABLE_{flag}"' in text for flag in FLAGS), "setup.py's nvcc flags changed"

switch = root / "csrc/flash_attn/src/static_switch.h"
strict = r"""#define HEADDIM_SWITCH(HEADDIM, ...)   \
  [&] {                                    \
    if (HEADDIM == 64) {                   \
      constexpr static int kHeadDim = 64;  \
      return __VA_ARGS__();                \
    } else if (HEADDIM == 128) {           \
      constexpr static int kHeadDim = 128; \
      return __VA_ARGS__();                \
    } else {                               \
      TORCH_CHECK(false, "this flash-attn build (benchmarks/build_flash_attn.sh) has head dims 64 and 128 only, not ", HEADDIM); \
    }                                      \
  }()"""
header, count = re.subn(r"#define HEADDIM_SWITCH\(HEADDIM, \.\.\.\).*?\}\(\)", lambda _: strict,
                        switch.read_text(), flags=re.S)
assert count == 1, "HEADDIM_SWITCH not found in static_switch.h"
switch.write_text(header)
kernels = sorted(p.name for p in (root / "csrc/flash_attn/src").glob("*_hdim*.cu"))
print(f"trimmed {root}: {len(kernels)} kernel files, head dims {sorted(HEAD_DIMS, key=int)}")
EOF
du -sh "$DEST"
[ -z "${TRIM_ONLY:-}" ] || exit 0

if ! ls "$DEST"/flash_attn_2_cuda*.so > /dev/null 2>&1; then
    start=$SECONDS
    (cd "$DEST" && FLASH_ATTN_CUDA_ARCHS=90 FLASH_ATTENTION_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-16} \
        NVCC_THREADS=${NVCC_THREADS:-2} python3 setup.py build_ext --inplace > build.log 2>&1) \
        || { tail -40 "$DEST/build.log"; exit 1; }
    echo "built in $((SECONDS - start)) s"
fi
PYTHONPATH="$DEST" python3 -c "import flash_attn, flash_attn_2_cuda; print('flash-attn', flash_attn.__version__, 'from', flash_attn.__file__)"
echo "PYTHONPATH=$(cd "$DEST" && pwd)"
