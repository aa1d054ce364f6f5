# embedpipe serve (and its Celery workers) in one image; see README.md, "Deploy".
#
#   docker build -t embedpipe .                                   # serve + celery extras
#   docker build -t embedpipe --build-arg EXTRAS=serve,celery,local .   # + local models on CPU torch
#
# With `local` in EXTRAS, put a CPU torch wheel in wheels/ first (a plain `torch` requirement would
# pull a multi-GB CUDA build):  pip download --no-deps -d wheels torch --index-url https://download.pytorch.org/whl/cpu
# Every wheel in wheels/ is offered to pip before the index; --build-arg PIP_NO_INDEX=1 builds from
# wheels/ alone (no index reachable), and --build-arg BASE=... swaps the base image.
ARG BASE=python:3.11-slim

# ---------------------------------------------------------------- build: a virtualenv with embedpipe in it
FROM ${BASE} AS build
ARG EXTRAS=serve,celery
ARG PIP_NO_INDEX=
ENV PIP_NO_INDEX=${PIP_NO_INDEX} PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_FIND_LINKS=/wheels
RUN python3 -m venv /opt/embedpipe
ENV PATH=/opt/embedpipe/bin:$PATH
COPY wheels/ /wheels/
RUN set -e; \
    if echo ",${EXTRAS}," | grep -q ",local,"; then \
      ls /wheels/torch-*.whl >/dev/null 2>&1 \
        || { echo "EXTRAS has local: put a CPU torch wheel in wheels/ (README.md, Deploy)" >&2; exit 1; }; \
      pip install /wheels/torch-*.whl; \
    fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY embedpipe/ embedpipe/
COPY langchain_embedpipe/ langchain_embedpipe/
COPY llamaindex_embedpipe/ llamaindex_embedpipe/
RUN pip install ".[${EXTRAS}]" && rm -rf /src

# ---------------------------------------------------------------- runtime: the base, the virtualenv, a user
FROM ${BASE}
COPY --from=build /opt/embedpipe /opt/embedpipe
ENV PATH=/opt/embedpipe/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 XDG_DATA_HOME=/data XDG_CACHE_HOME=/data/cache
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin embedpipe \
    && mkdir -p /data /etc/embedpipe && chown embedpipe /data
USER embedpipe
WORKDIR /data
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["embedpipe"]
CMD ["serve", "--config", "/etc/embedpipe/serve.toml"]
