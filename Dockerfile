# One image for every role: controller, sidecar, webhook, simulator, convert.
#   make image                       # docker build -t ghcr.io/tokenscaler/tokenscaler:$(VERSION) .
#   docker run --rm ghcr.io/tokenscaler/tokenscaler:$(VERSION) --help
# It holds the base install only (the wheel, no extras: no plotting, live display or load
# client). The manifests under k8s/ run it as `tokenscaler <role> ...` (ENTRYPOINT), as user
# 10001 with a read-only root filesystem. Pin the base by digest in your registry mirror for
# reproducible builds.

FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE MANIFEST.in ./
COPY tokenscaler ./tokenscaler
# the release artefact (what `python -m build` makes), then that wheel alone into the venv
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
    && python -m venv /opt/tokenscaler \
    && /opt/tokenscaler/bin/pip install --no-cache-dir --no-compile /dist/tokenscaler-*.whl \
    && /opt/tokenscaler/bin/python -m compileall -q /opt/tokenscaler

FROM python:3.11.13-slim-bookworm
ARG VERSION=""
LABEL org.opencontainers.image.title="tokenscaler" \
      org.opencontainers.image.description="Token pools: admission and autoscaling for multi-tenant LLM inference" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
ENV PATH=/opt/tokenscaler/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 tokenscaler \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin tokenscaler
COPY --from=build /opt/tokenscaler /opt/tokenscaler
USER 10001:10001
WORKDIR /tmp
# 9491 controller gRPC (KEDA's external scaler), 8080 controller HTTP(S) API (limits, plan, metrics),
# 8443 webhook HTTPS, 8001 sidecar proxy, 9464 sidecar metrics
EXPOSE 9491 8080 8443 8001 9464
ENTRYPOINT ["tokenscaler"]
CMD ["--help"]
