# veritune serve, CPU image. Build from the project root after `dvc repro` (or `dvc pull`):
#   docker build -t veritune-serve .
#   docker run -p 8000:8000 -e VERITUNE_API_KEYS=<key of 16+ chars> \
#     -v $PWD/models:/app/models:ro -v $PWD/data/index:/app/data/index veritune-serve
# Keys are required: the server binds 0.0.0.0 here and refuses to without them.
# GPU: start FROM an nvidia/cuda runtime image with Python 3.11, install the CUDA torch wheel
# instead of the CPU one, run with `--gpus all`; serve.dtype auto then serves in bf16.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORKDIR /app
RUN pip install --no-cache-dir "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md LICENSE ./
COPY veritune ./veritune
RUN pip install --no-cache-dir .
COPY params.yaml ./
# models/ and data/index/ come in as volumes (DVC outputs, not part of the image).
RUN useradd --create-home veritune && mkdir -p models data/index && chown -R veritune /app
USER veritune
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
CMD ["veritune", "serve", "--host", "0.0.0.0", "--port", "8000"]
