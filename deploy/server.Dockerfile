# syntax=docker/dockerfile:1
# The coordinator's image: flower-superlink (TLS, SuperNode authentication) and the fedsynth
# ServerApp runtime. In Flower 1.42 a SuperLink started with `--isolation subprocess` launches
# flower-superexec itself, which runs each submitted ServerApp with the packages installed here:
# no separate SuperExec container is needed.
#
# Build from the repository root:
#   docker build -f deploy/server.Dockerfile -t fedsynth-server:0.1.0 .
# Run with the server kit of `fedsynth provision` mounted read-only at /etc/fedsynth/kit
# (see deploy/compose.yaml, deploy/k8s/superlink.yaml and docs/deployment.md).
FROM python:3.11-slim-bookworm

# No telemetry, no update checks, and no `uv sync` of app dependencies at run time:
# everything the ServerApp needs is installed below, and nothing is fetched later.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_HOME=/tmp/flwr \
    HOME=/tmp

# CPU torch first, so the project's `torch>=` requirement is already met by the CPU build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /opt/fedsynth
COPY pyproject.toml README.md LICENSE ./
COPY common ./common
COPY client ./client
COPY server ./server
COPY deploy/healthcheck.py ./deploy/healthcheck.py
RUN pip install "torch==2.13.0" "flwr[simulation]==1.42.0" .

RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin fedsynth \
    && mkdir -p /etc/fedsynth/kit /etc/fedsynth/federation /var/lib/fedsynth-server \
    && chown 10001:10001 /var/lib/fedsynth-server
USER 10001:10001
# superlink.db (registered site keys, runs) and the federations' output_dir live here
WORKDIR /var/lib/fedsynth-server
VOLUME ["/var/lib/fedsynth-server"]

# 9093: the one TLS port (hospitals' SuperNodes and the coordinator's flwr CLI).
# 9098: plaintext gRPC health service for probes only; never publish it.
EXPOSE 9093
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/fedsynth/deploy/healthcheck.py", "127.0.0.1:9098"]
ENTRYPOINT ["flower-superlink", \
    "--ssl-ca-certfile", "/etc/fedsynth/kit/ca.pem", \
    "--ssl-certfile", "/etc/fedsynth/kit/server.pem", \
    "--ssl-keyfile", "/etc/fedsynth/kit/server.key", \
    "--enable-supernode-auth", \
    "--isolation", "subprocess", \
    "--disable-runtime-dependency-installation", \
    "--database", "/var/lib/fedsynth-server/superlink.db", \
    "--host", "0.0.0.0", "--port", "9093", \
    "--health-server-address", "0.0.0.0:9098"]
