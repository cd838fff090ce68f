#!/usr/bin/env python3
"""Container health check: exit 0 when a Flower gRPC health server answers SERVING.

Usage: healthcheck.py [HOST:PORT]   (default 127.0.0.1:9098)

``flower-superlink`` and ``flower-supernode`` start this server with
``--health-server-address``. It says the process is up and serving, no more: a SuperNode
whose SuperLink is unreachable exits on its own, so a restart policy covers that case.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:9098"


def check(address: str, timeout_s: float = 3.0) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    except grpc.RpcError as err:
        print(f"unhealthy: {address}: {err.code().name}", file=sys.stderr)
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


if __name__ == "__main__":
    sys.exit(0 if check(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_ADDRESS) else 1)
