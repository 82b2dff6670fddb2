# One image for the service (`python -m service`) and the loader (`python -m loader`);
# docker-compose.yml and deploy/kubernetes/ run both from it.
#
# The base is pinned by exact version and by digest, so a rebuild gets the same system
# and Python. The digest is the one public projects pin for this tag; it was not checked
# against the registry here (no Docker engine). To move to a newer patch release:
#   docker buildx imagetools inspect python:3.11.N-slim-bookworm   # prints the digest
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The pinned dependencies first, in their own layer: a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import subprocess, sys, tomllib; \
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
subprocess.check_call([sys.executable, '-m', 'pip', 'install', *deps])"
COPY core ./core
COPY service ./service
COPY loader ./loader
RUN pip install --no-deps .

COPY config.yaml ./
COPY deploy/config.compose.yaml ./deploy/config.compose.yaml
COPY lists ./lists

RUN useradd --system --uid 10001 --no-create-home callscreen
USER callscreen

EXPOSE 8080 9108
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service", "--config", "deploy/config.compose.yaml"]
