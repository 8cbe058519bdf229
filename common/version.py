"""The installed fedcmp version and the versions of the libraries a run depends on (`--version`, build info)."""
from __future__ import annotations

import platform
from importlib import metadata

# Distributions whose versions decide what a run computes or how it talks.
KEY_DEPENDENCIES = ("torch", "transformers", "grpcio", "protobuf", "safetensors")


def fedcmp_version() -> str:
    return _installed("fedcmp")


def build_info() -> dict[str, str]:
    """fedcmp's version, Python's and the key dependencies', read from the installed metadata (no imports)."""
    return {"version": fedcmp_version(), "python": platform.python_version(),
            **{name: _installed(name) for name in KEY_DEPENDENCIES}}


def describe_build(prog: str) -> str:
    """e.g. `fedcmp-server 0.1.0 (python 3.11.2, torch 2.13.0, transformers 5.24.0, ...)`."""
    info = build_info()
    libraries = ", ".join(f"{name} {value}" for name, value in info.items() if name != "version")
    return f"{prog} {info['version']} ({libraries})"


def _installed(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"
