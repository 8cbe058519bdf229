"""Shared pytest fixtures: the micro model zoo, built once per test session.

Sets ``OMP_WAIT_POLICY=PASSIVE`` (unless already set) before torch is imported: on a busy
2-core machine, OpenMP threads spin-waiting on each other made small CPU models 15-30x slower.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from fedcmp.common.zoo import MicroZoo, ensure_micro_zoo  # noqa: E402


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory: pytest.TempPathFactory) -> MicroZoo:
    """The micro zoo, reused from ``$FEDCMP_CACHE`` when set, else built (~1-2 min) into a
    session temp dir. Its cache dir (for ``--cache-dir`` / ``resolve_backbone``) is
    ``micro_zoo.root.parent``."""
    cache = os.environ.get("FEDCMP_CACHE")
    return ensure_micro_zoo(Path(cache) if cache else tmp_path_factory.mktemp("fedcmp-cache"))
