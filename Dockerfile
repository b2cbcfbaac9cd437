# mirror: a streaming pull-through caching mirror for OCI container registries.
#   docker build -t mirror .
#   docker run -v mirror-cache:/var/cache/mirror -p 5000:5000 mirror
# BASE: any image with python3 (>= 3.11), its venv module and useradd.
# WHEELS: a directory in the build context holding wheels of every dependency (and of
# setuptools and wheel), for a build without network access; empty: use the package index.
# Few instructions: each is a step, and some storage drivers copy the whole tree per step.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG WHEELS=""
# .dockerignore lets in only pyproject.toml, README.md, mirror/ and wheels/.
COPY . /src/
# A virtual environment: a Debian python refuses installs into the system's (PEP 668).
RUN export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    && python3 -m venv /opt/mirror \
    && cd /src \
    && if [ -n "$WHEELS" ]; then \
           /opt/mirror/bin/pip install --no-index --find-links "$WHEELS" . ; \
       else \
           /opt/mirror/bin/pip install . ; \
       fi \
    && cd / && rm -rf /src \
    && useradd --system --create-home --home-dir /home/mirror --shell /usr/sbin/nologin mirror \
    && mkdir -p /var/cache/mirror \
    && chown mirror:mirror /var/cache/mirror

ENV PATH=/opt/mirror/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MIRROR_CACHE_DIR=/var/cache/mirror \
    MIRROR_LISTEN=0.0.0.0:5000
VOLUME /var/cache/mirror
EXPOSE 5000
# /healthz on the port of MIRROR_LISTEN, over https when MIRROR_TLS_CERT is set.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request as r; port = os.environ.get('MIRROR_LISTEN', ':5000').rpartition(':')[2]; scheme = 'https' if os.environ.get('MIRROR_TLS_CERT') else 'http'; r.urlopen(f'{scheme}://127.0.0.1:{port}/healthz', timeout=4, context=ssl._create_unverified_context())"]
USER mirror
ENTRYPOINT ["mirror"]
CMD ["serve"]
