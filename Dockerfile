# modelpool, CPU image. Build: docker build -t modelpool:cpu .
# Run one machine's pool: docker run -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#   -v "$PWD/models:/models:ro" modelpool:cpu
# The CUDA image is Dockerfile.cuda; the same entrypoint and commands.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
# torch's CPU build: a bare "torch" from PyPI is the CUDA build, gigabytes of libraries
# this image never uses. Override both for another build or a mirror.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, in its own layer: it is most of the image and changes least often.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway/ gateway/
COPY placement/ placement/
COPY gpu/ gpu/
COPY cache/ cache/
COPY loadtests/ loadtests/
# A regular (non-editable) install of the package and its runtime dependencies only:
# no test extra. torch is already satisfied by the CPU build above.
RUN pip install --no-cache-dir . && modelpool --help >/dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="modelpool" \
      org.opencontainers.image.description="Many-model inference gateway (KServe v2 / Triton protocol), CPU build" \
      org.opencontainers.image.source="https://github.com/modelpool/modelpool" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it without runAsUser.
RUN groupadd --system --gid 10001 modelpool \
 && useradd --system --uid 10001 --gid modelpool --create-home --home-dir /home/modelpool modelpool \
 && mkdir /models \
 && chown modelpool:modelpool /models
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/modelpool
# /models is owned by the image's user, so a fresh named volume mounted there is
# writable by `modelpool examples --out /models`.
VOLUME ["/models"]
# REST, gRPC, metrics (and, for workers, health on the metrics port).
EXPOSE 8000 8001 8002
ENTRYPOINT ["modelpool"]
# The default runs the whole pool (gateway and a local worker) over /models. --insecure:
# no auth config, open to whoever reaches the published ports; for anything but a local
# trial pass --auth-config (docs/security.md) instead of --insecure.
CMD ["serve", "--model-repository", "/models", "--host", "0.0.0.0", "--insecure"]
