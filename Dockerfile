# mirror: a streaming pull-through caching mirror for OCI container registries.
#   docker build -t mirror .
#   docker run -v mirror-cache:/var/cache/mirror -p 5000:5000 mirror
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY mirror ./mirror
RUN pip install . \
    && useradd --system --create-home --home-dir /home/mirror --shell /usr/sbin/nologin mirror \
    && mkdir -p /var/cache/mirror \
    && chown mirror:mirror /var/cache/mirror

ENV MIRROR_CACHE_DIR=/var/cache/mirror \
    MIRROR_LISTEN=0.0.0.0:5000
VOLUME /var/cache/mirror
EXPOSE 5000

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=4)"]

USER mirror
WORKDIR /home/mirror
ENTRYPOINT ["mirror"]
CMD ["serve"]
