# Container image of the gateway: a multi-stage build, non-root at run time.
#
#   docker build -t gateway .
#   docker run --rm -p 8080:8080 -p 8081:8081 -p 9901:9901 \
#     -v "$PWD/config/docker.yaml:/etc/gateway/gateway.yaml:ro" gateway
#
# The configuration is read from /etc/gateway/gateway.yaml (mount your own over it; the image
# ships config/docker.yaml there, which listens on 0.0.0.0 so probes from outside reach it).
# Ports: 8080 proxy, 8081 health (/healthz, /readyz), 9901 metrics and admin API.
# `docker kill -s HUP` reloads the file, `docker stop` (SIGTERM) drains, SIGUSR1 reopens the
# access-log file. Set GATEWAY_ADMIN_TOKEN when the admin port is reachable by others.

# ---- builder: build the wheel, install it with its runtime dependencies into a venv -----------
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# gcc: the data plane is compiled with mypyc while the wheel is built (setup.py); the image's Python
# has its headers. Not pinned (DL3008): Debian replaces versions in point releases, and the
# compiler only runs here, in the builder stage.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/gateway \
 && /opt/gateway/bin/pip install --no-cache-dir /wheels/*.whl

# ---- runtime: the venv only (no build tools, no sources, no test dependencies) ------------------
FROM python:3.11-slim AS runtime
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin gateway
COPY --from=builder /opt/gateway /opt/gateway
COPY config/docker.yaml /etc/gateway/gateway.yaml
USER 10001:10001
EXPOSE 8080 8081 9901
STOPSIGNAL SIGTERM
# The health port answers from its own thread: 200 unless the proxy loop is stalled (no curl in slim).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8081/healthz', timeout=2).status != 200)"]
CMD ["gateway", "run", "--config", "/etc/gateway/gateway.yaml"]
