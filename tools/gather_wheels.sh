#!/usr/bin/env bash
# The wheels `make gpu-check` needs on the GPU machine and that machine lacks, into .whl/ (git-ignored).
#
#   bash tools/gather_wheels.sh          download them (needs the network), then check the total
#   bash tools/gather_wheels.sh --check DIR   only check that DIR's wheels fit what travels
#
# The GPU machine has Python 3.12, torch 2.11 (CUDA 13), triton 3.6, cuda-bindings, numpy, click, psutil,
# prometheus-client, pytest, hypothesis and transformers 5.17 with its requirements, and no network. It
# lacks: posix_ipc; a transformers in kvmem's range (pyproject: >=5.23.0,<5.25; the newest, 5.24.0); of
# that release's requirements, only huggingface-hub (5.24 needs >=1.31, as 5.23 did; 5.17 accepted >=1.5:
# the rest are the same);
# click at the huggingface-hub's floor (>=8.4.2); setuptools, to install kvmem from the tree offline (>=74.1:
# pyproject declares kvmem's C extensions, kvmem/_block_allocator.c and device/_host_copy.c, which the install compiles there with the
# machine's C compiler and Python 3.12 headers: Triton needs both to build its launchers, so a machine that
# runs the kernels has them; no GPU run has confirmed it yet).
# The wheels go in with --no-deps, so the pins were chosen against each other's requirements; hub 1.31's
# hf-xet (>=1.5.2) and httpx serve downloads only, and are taken as the machine has them.
# The working tree travels with them (the device tool's carry: [".whl"]), 64 MiB in all: the check adds
# the tree's tracked files to the wheels.
set -euo pipefail

LIMIT_MIB=64
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PINS=(
    posix_ipc==1.3.2
    transformers==5.24.0
    huggingface-hub==1.31.0
    click==8.4.2
    setuptools==84.2.1
)

check() {
    local dir=$1 wheels tree total
    wheels=$(find "$dir" -maxdepth 1 -type f -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
    tree=$(git -C "$REPO" ls-files -z | (cd "$REPO" && xargs -0 stat -c %s) | awk '{s += $1} END {print s + 0}')
    total=$((wheels + tree))
    echo "gather_wheels: $(find "$dir" -maxdepth 1 -type f -name '*.whl' | wc -l) wheels, $wheels bytes, and the tree's" \
        "$tree bytes: $((total / 1024 / 1024)) MiB of the $LIMIT_MIB MiB that may travel"
    if ((total > LIMIT_MIB * 1024 * 1024)); then
        echo "gather_wheels: too much to travel: drop a wheel or pick a smaller release" >&2
        return 1
    fi
}

if [[ ${1:-} == --check ]]; then
    check "${2:?--check needs a directory}"
    exit
fi

DEST="$REPO/.whl"
rm -rf "$DEST"
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PINS[@]}"
check "$DEST"
