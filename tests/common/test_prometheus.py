"""Every fedcmp metrics endpoint carries process metrics and the build info."""
from __future__ import annotations

from prometheus_client import generate_latest

from fedcmp.common.prometheus import new_registry
from fedcmp.common.version import build_info


def test_a_new_registry_has_process_platform_and_build_info() -> None:
    exposition = generate_latest(new_registry()).decode()
    assert "process_cpu_seconds_total" in exposition and "python_info{" in exposition
    info = build_info()
    assert f'fedcmp_build_info{{' in exposition and f'version="{info["version"]}"' in exposition
    assert f'torch="{info["torch"]}"' in exposition
