FROM python:3.11-slim
# Logs reach `docker logs` as they are written, not when a buffer fills.
ENV PYTHONUNBUFFERED=1
WORKDIR /app
# alembic.ini and migrations/ ride along: the compose `migrate` job runs `strata migrate` from here.
COPY pyproject.toml README.md alembic.ini ./
COPY registry registry
COPY services services
COPY workers workers
COPY continual continual
COPY api api
COPY migrations migrations
# The image is for GPU workers: the package index's torch==2.13.0 build carries CUDA.
# One image serves every service, so it includes the `monitor` extra that Flower needs.
RUN pip install --no-cache-dir ".[monitor]" \
    && useradd --create-home strata && mkdir -p /var/lib/strata && chown strata /var/lib/strata
# Nothing in the image needs root at run time; a compromised process cannot rewrite the code.
USER strata
CMD ["strata", "--help"]
