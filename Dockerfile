# One image for the API and the workers: CPU-only PyTorch, non-root, health-checked.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CPU wheel index, pinned: PyPI's default Linux wheel is a multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
WORKDIR /src
# Dependencies in their own layer, so code changes do not reinstall them.
COPY pyproject.toml README.md constraints.txt ./
RUN mkdir app && touch app/__init__.py && pip install -c constraints.txt ".[s3]" && pip uninstall -y slimserve
COPY app ./app
RUN pip install --no-deps .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 slimserve && mkdir -p /data && chown slimserve /data
COPY --from=build /opt/venv /opt/venv
COPY models /opt/slimserve/models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    ORT_DISABLE_TELEMETRY=1 \
    SLIMSERVE_HOST=0.0.0.0 \
    SLIMSERVE_PORT=8000 \
    SLIMSERVE_DATA_DIR=/data \
    SLIMSERVE_PRELOAD_MODELS='{"digits": {"file": "/opt/slimserve/models/digits_cnn.onnx", "samples": "/opt/slimserve/models/digits_cnn.samples.npz"}}'
USER slimserve
WORKDIR /home/slimserve
VOLUME ["/data"]
# HTTP (REST, /metrics) and gRPC (Open Inference Protocol).
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"]
# Listening on all interfaces needs SLIMSERVE_API_KEYS (or SLIMSERVE_ALLOW_INSECURE=1): the server refuses otherwise.
CMD ["slimserve", "serve"]
