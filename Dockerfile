FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY registry registry
COPY workers workers
COPY continual continual
COPY api api
COPY migrations migrations
# The image is for GPU workers: the package index's torch==2.13.0 build carries CUDA.
RUN pip install --no-cache-dir . \
    && useradd --create-home strata && mkdir -p /var/lib/strata && chown strata /var/lib/strata
USER strata
CMD ["strata", "--help"]
