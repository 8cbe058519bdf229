"""The distribution built as a wheel maps the card's folders into `fedcmp.*` and imports on its own."""
from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["fedcmp.common.wire.coordinator_pb2_grpc", "fedcmp.common.recipe", "fedcmp.server.cli",
           "fedcmp.server.strategies", "fedcmp.client.cli", "fedcmp.sim", "fedcmp.export.cli"]


def test_wheel_holds_only_fedcmp_packages_and_imports_from_itself(tmp_path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    wheel = next((tmp_path / "dist").glob("fedcmp-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_levels = {name.split("/")[0] for name in names if not name.startswith("fedcmp-")}
    assert top_levels == {"fedcmp"}, f"generic top-level packages leaked into site-packages: {top_levels}"
    assert "fedcmp/common/wire/coordinator_pb2.py" in names

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", site, str(wheel)],
                   check=True)
    # Third-party dependencies come from the test venv; its editable fedcmp finder does not (a bare path
    # in a .pth file is not a site dir, so the editable hook's own .pth is never run).
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = "import importlib, fedcmp.common; " + "; ".join(f"importlib.import_module('{m}')" for m in MODULES) + \
            "; print(fedcmp.common.__file__)"
    located = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert located.returncode == 0, located.stderr
    assert located.stdout.strip().startswith(site)
