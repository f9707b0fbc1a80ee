# One image for every Distillery process: the API, the Celery worker and beat, Flower
# and the migrate step (`alembic upgrade head`). docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    OMP_WAIT_POLICY=PASSIVE \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed uid, so a bind-mounted /data can be given to it on the host (chown 10001).
# /data holds the artifacts and the workers' job files: docker seeds an empty named
# volume mounted there with this folder's ownership, so the non-root user can write it.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/distillery \
        distillery \
    && mkdir -p /data/artifacts /data/work \
    && chown -R distillery:distillery /data

# torch first, in a layer of its own: it is by far the largest download and changes least.
# On linux x86_64 PyPI's default torch wheel is the CUDA build (the CUDA runtime arrives as
# nvidia-* wheels), which is what the GPU workers need; the host provides only the driver,
# through the NVIDIA container toolkit. The version is the one pyproject.toml pins.
RUN pip install torch==2.13.0

WORKDIR /srv/distillery

# The dependencies from the project's metadata alone, so this layer is rebuilt only when
# pyproject.toml changes. Without sources yet it installs an empty `distillery` package.
COPY pyproject.toml README.md ./
RUN pip install '.[engine,service]' && rm -rf build *.egg-info

# The sources last: a code change rebuilds only from here. alembic.ini and migrations/
# stay in the working directory, where `alembic upgrade head` looks for them.
COPY alembic.ini ./
COPY migrations ./migrations
COPY app ./app
COPY worker ./worker
RUN pip install --no-deps --force-reinstall . && rm -rf build *.egg-info

# Settings default to an embedded var/ under the working directory, which this user cannot
# write: keep the files in /data instead. The database and broker come from the deployment.
ENV DISTILL_STORAGE_URL=file:///data/artifacts \
    DISTILL_WORK_DIR=/data/work

USER distillery

EXPOSE 8000

# Liveness of the API; services running another command override it in docker-compose.yml.
# urlopen raises on a refused connection or a non-2xx answer, so the exit status is 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# Several API processes share the port; uvicorn reads their count from WEB_CONCURRENCY
# (docker-compose.yml sets it from DISTILL_API_WORKERS). Each process has its own
# database pool (DISTILL_DATABASE_POOL_SIZE + DISTILL_DATABASE_MAX_OVERFLOW connections).
ENV WEB_CONCURRENCY=2
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", \
     "--http", "app.http_protocol:BoundedHeadersProtocol"]
