"""What every fedcmp Prometheus endpoint carries besides its own metrics: process metrics and build info."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Info, PlatformCollector, ProcessCollector, start_http_server

from fedcmp.common.version import build_info


def new_registry() -> CollectorRegistry:
    """A registry with `process_*` (CPU, memory, open fds, start time), `python_info` and `fedcmp_build_info`."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    Info("fedcmp_build", "fedcmp version and the versions of its key libraries", registry=registry).info(build_info())
    return registry


def serve_metrics(registry: CollectorRegistry, port: int, host: str) -> None:
    """Serve `registry` as Prometheus text at http://host:port/metrics from a daemon thread."""
    start_http_server(port, addr=host, registry=registry)
