# syntax=docker/dockerfile:1
# tokengate's image: `gateway serve` (and the rest of the `gateway` CLI) on Python 3.11.
#
#   docker build -t tokengate:0.1.0 .
#   docker run -v ./gateway.toml:/etc/tokengate/gateway.toml:ro -p 8080:8080 tokengate:0.1.0
#
# deploy/k8s/ runs it (the ConfigMap's gateway.toml is rendered to /etc/tokengate/gateway.toml).
# CI does not build this image: tests/unit/test_deploy_k8s.py checks its shape only.

# Builder: the Rust toolchain of rust-toolchain.toml and maturin of pyproject.toml build the
# wheel (the `gateway` package with its `gateway._core` extension; protoc comes vendored). The
# extension links the system's SQLite, which the runtime image's Python runs too.
FROM rust:1.95.0-slim-bookworm AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv libsqlite3-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/maturin && /opt/maturin/bin/pip install --no-cache-dir maturin==1.16.0
WORKDIR /src
# rust-toolchain.toml stays out: the image's toolchain is that version, and the file's extra
# components (clippy, rustfmt) would be downloaded for nothing.
COPY Cargo.toml Cargo.lock pyproject.toml README.md ./
COPY rust ./rust
COPY protos ./protos
COPY python ./python
RUN /opt/maturin/bin/maturin build --release --out /wheels

# Runtime: the wheel and its dependencies on a slim Python, as an unprivileged user.
FROM python:3.11-slim-bookworm AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=builder /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels
# A numeric user, so that Kubernetes' runAsNonRoot can check it (deploy/k8s runs as 10001 too).
RUN groupadd --system --gid 10001 tokengate \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin tokengate \
    && mkdir -p /etc/tokengate /var/lib/tokengate \
    && chown 10001:10001 /var/lib/tokengate
USER 10001:10001
WORKDIR /var/lib/tokengate
# HTTP API and /metrics, gRPC API, admin and billing APIs (deploy/k8s/base/gateway.toml).
EXPOSE 8080 50051 8090
ENTRYPOINT ["gateway", "serve", "--config", "/etc/tokengate/gateway.toml"]
