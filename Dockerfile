# pdserve on NVIDIA GPUs: one image for the router, prefill and decode services (docker-compose.yml).
# The base image brings the CUDA build of PyTorch; `pip install .` keeps it and adds pdserve.
# CI lints this file (hadolint) but does not build it: CI machines have no Docker engine.
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/pdserve
COPY pyproject.toml README.md ./
COPY pdserve ./pdserve
COPY engine ./engine
COPY router ./router
COPY prefill_worker ./prefill_worker
COPY decode_worker ./decode_worker
COPY kvtransfer ./kvtransfer
COPY loadtest ./loadtest
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 pdserve

USER 1000
EXPOSE 8000 5557 6000
ENTRYPOINT ["pdserve"]
CMD ["serve", "--host", "0.0.0.0", "--help"]
