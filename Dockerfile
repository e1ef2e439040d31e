# One image for every role: controller, sidecar, webhook, simulator, convert.
#   docker build -t ghcr.io/tokenscaler/tokenscaler:0.1.0 .
#   docker run --rm ghcr.io/tokenscaler/tokenscaler:0.1.0 --help
# The manifests under k8s/ run it as `tokenscaler <role> ...` (ENTRYPOINT), as user 10001 with a
# read-only root filesystem. Pin the base by digest in your registry mirror for reproducible builds.

FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/tokenscaler
COPY pyproject.toml README.md ./
COPY tokenscaler ./tokenscaler
RUN /opt/tokenscaler/bin/pip install --no-compile . \
    && /opt/tokenscaler/bin/python -m compileall -q /opt/tokenscaler

FROM python:3.11.13-slim-bookworm
LABEL org.opencontainers.image.title="tokenscaler" \
      org.opencontainers.image.description="Token pools: admission and autoscaling for multi-tenant LLM inference" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/tokenscaler/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 tokenscaler \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin tokenscaler
COPY --from=build /opt/tokenscaler /opt/tokenscaler
USER 10001:10001
WORKDIR /tmp
# 9090 gRPC scaler, 8080 controller HTTP (limits, plan, metrics), 8443 webhook, 8001/9464 sidecar
EXPOSE 9090 8080 8443 8001 9464
ENTRYPOINT ["tokenscaler"]
CMD ["--help"]
