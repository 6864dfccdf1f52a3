# `scaleforge serve --repository /models`: every model of the repository mounted at /models, on port 8000.
#
#   docker build -t scaleforge:cpu .                                     # CPU (the default)
#   docker build -t scaleforge:cuda --build-arg TORCH_INDEX=https://pypi.org/simple --build-arg EXTRAS=serve,gpu .
#   docker run -p 8000:8000 -v "$PWD/models:/models:ro" scaleforge:cpu
#
# docs/deploy.md has the rest: the API key, the CUDA image on a GPU, the Kubernetes manifests in deploy/.

# Where torch comes from. PyTorch's CPU index holds torch built without CUDA, which pulls none of the CUDA libraries'
# wheels; PyPI's Linux wheels are CUDA builds that bring those libraries as wheels, so the CUDA image keeps the same
# slim base and needs only the host's driver (the NVIDIA container toolkit mounts it). constraints.txt pins torch.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# scaleforge's extras: `serve,gpu` adds NVML's GPU figures to /metrics.
ARG EXTRAS=serve

FROM python:3.11-slim AS build
ARG TORCH_INDEX
ARG EXTRAS
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
# A virtual environment, copied whole into the final stage, leaves pip's build tools and the sources behind.
RUN python -m venv /opt/scaleforge \
    && /opt/scaleforge/bin/pip install --no-cache-dir --disable-pip-version-check \
        --extra-index-url "${TORCH_INDEX}" -c constraints.txt ".[${EXTRAS}]"

FROM python:3.11-slim
COPY --from=build /opt/scaleforge /opt/scaleforge
# A fixed numeric user, so that Kubernetes' runAsNonRoot can check it without a user name to look up.
RUN groupadd --system --gid 10001 scaleforge \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp scaleforge
ENV PATH=/opt/scaleforge/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001
WORKDIR /tmp
EXPOSE 8000
# For `docker run`; Kubernetes ignores HEALTHCHECK and uses the Deployment's probes (deploy/deployment.yaml).
# The slim image has no curl: Python's urllib asks, and any answer but 2xx fails the check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=4)"]
ENTRYPOINT ["scaleforge", "serve"]
# 0.0.0.0: the server binds 127.0.0.1 by default, which inside a container only the container itself can reach.
CMD ["--repository", "/models", "--host", "0.0.0.0", "--port", "8000"]
