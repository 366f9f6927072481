# syntax=docker/dockerfile:1
# One image for every process of the platform: `docker run IMAGE serve <name>` (names in pms/registry.py).
#
# build stage: install the pinned dependencies into a venv, generate the protobuf stubs from proto/
# and install the project (non-editable) with them; the runtime stage copies only the venv.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src
RUN python -m venv /opt/venv

# Dependencies first (their own layer, rebuilt only when pyproject.toml changes).
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY proto/ proto/
COPY pms/ pms/
COPY api/ api/
COPY billing/ billing/
COPY stream_processing/ stream_processing/
COPY dashboard/ dashboard/
COPY infra/ infra/

# Stubs are generated here (never committed) and shipped inside the installed package.
RUN python -m pms.contracts \
    && pip install --no-deps . \
    && python -c "from pms.contracts import billing_pb2, billing_pb2_grpc, patient_events_pb2"


FROM python:3.11-slim AS runtime

LABEL org.opencontainers.image.title="pms" \
      org.opencontainers.image.description="Patient management & analytics platform: every service, one image"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PMS_DATA_DIR=/var/lib/pms \
    PMS_LOG_LEVEL=INFO

# A fixed non-root uid/gid so volume permissions are predictable.
RUN groupadd --system --gid 10001 pms \
    && useradd --system --uid 10001 --gid pms --home-dir /var/lib/pms --create-home --shell /usr/sbin/nologin pms

COPY --from=build /opt/venv /opt/venv

WORKDIR /var/lib/pms
USER 10001:10001

# Documentation only: each service listens on its own setting (gateway 4004, auth 4005, patient 4000,
# analytics 4002, billing 9001, pipeline 4010, dashboard 8501).
EXPOSE 4000 4002 4004 4005 4010 8501 9001

# Probes whichever service `serve NAME` started (HTTP /ready or the gRPC health service).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "infra.healthcheck"]

ENTRYPOINT ["pms"]
CMD ["serve", "gateway"]
