# syntax=docker/dockerfile:1
# A hospital's image: flower-supernode and the fedsynth ClientApp runtime (torch, MONAI, Opacus).
# The SuperNode makes one outbound TLS connection to the coordinator's SuperLink and starts a
# ClientApp process for each task; nothing listens for the outside world.
#
# Build from the repository root (the hospital builds it from reviewed source):
#   docker build -f deploy/hospital.Dockerfile -t fedsynth-hospital:0.1.0 .
# Mounts: the site kit read-only at /etc/fedsynth/kit, the scans read-only at /data/scans,
# the state folder (privacy ledger) read-write at /var/lib/fedsynth. See docs/deployment.md.
FROM python:3.11-slim-bookworm

# No telemetry, no update checks. A SuperNode installs app dependencies only when started with
# --allow-runtime-dependency-installation, which this image never passes; the variable below
# is for the SuperLink and harmless here. The SuperExec that the SuperNode starts looks for a new
# task every 0.1 s instead of every second: each message's ClientApp process starts sooner.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 \
    FLWR_HOME=/tmp/flwr \
    HOME=/tmp

RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /opt/fedsynth
COPY pyproject.toml README.md LICENSE ./
COPY common ./common
COPY client ./client
COPY server ./server
COPY deploy/healthcheck.py ./deploy/healthcheck.py
RUN pip install "torch==2.13.0" "flwr[simulation]==1.42.0" .

RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin fedsynth \
    && mkdir -p /etc/fedsynth/kit /data/scans /var/lib/fedsynth \
    && chown 10001:10001 /var/lib/fedsynth
USER 10001:10001
WORKDIR /var/lib/fedsynth
# privacy_ledger.json: back it up, never delete it (docs/deployment.md)
VOLUME ["/var/lib/fedsynth"]

# 9098: plaintext gRPC health service for probes only; never publish it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/fedsynth/deploy/healthcheck.py", "127.0.0.1:9098"]
ENTRYPOINT ["flower-supernode", \
    "--root-certificates", "/etc/fedsynth/kit/ca.pem", \
    "--auth-supernode-private-key", "/etc/fedsynth/kit/supernode.key", \
    "--isolation", "subprocess", \
    "--node-config", "site-config=\"/etc/fedsynth/kit/site.yaml\"", \
    "--health-server-address", "0.0.0.0:9098"]
# The coordinator's address, as given to `fedsynth provision --server-host`: override it.
CMD ["--superlink", "superlink.example.org:9093"]
