"""Regenerates the committed gRPC stubs from proto/ (`make proto`) and checks they are fresh.

grpc_tools writes `from fedcmp.v1 import coordinator_pb2`; the stubs live in
`fedcmp.common.wire`, so that import is rewritten. `python -m fedcmp.common.protogen --check`
exits 1 when the committed stubs differ from what the .proto files produce. The comparison
is on what the stubs mean (the serialized file descriptor and the RPC method paths), not on
their text, so a newer grpcio-tools that formats differently does not count as stale.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO_PACKAGE = "fedcmp/v1"
GENERATED_IMPORT = "from fedcmp.v1 import"
PACKAGE_IMPORT = "from fedcmp.common.wire import"
STUB_SUFFIXES = ("_pb2.py", "_pb2_grpc.py")
DESCRIPTOR_LINE = re.compile(r"^DESCRIPTOR = .*AddSerializedFile\((.*)\)$", re.MULTILINE)
METHOD_PATH = re.compile(r"['\"](/fedcmp\.v1\.\w+/\w+)['\"]")


def generate(proto_root: Path) -> dict[str, str]:
    """File name -> contents of every stub generated from `proto_root/fedcmp/v1/*.proto`."""
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted((proto_root / PROTO_PACKAGE).glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root / PROTO_PACKAGE}")
    with tempfile.TemporaryDirectory() as out:
        args = ["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out}",
                f"--grpc_python_out={out}", *map(str, protos)]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + ", ".join(map(str, protos)))
        generated = Path(out) / PROTO_PACKAGE
        return {path.name: path.read_text().replace(GENERATED_IMPORT, PACKAGE_IMPORT)
                for path in sorted(generated.iterdir()) if path.name.endswith(STUB_SUFFIXES)}


def meaning(text: str) -> tuple[str, ...]:
    """What a stub encodes: its serialized descriptor(s) and the RPC method paths it calls."""
    return tuple(DESCRIPTOR_LINE.findall(text)) + tuple(sorted(set(METHOD_PATH.findall(text))))


def stale_stubs(proto_root: Path, wire_dir: Path) -> list[str]:
    """Names of stubs in `wire_dir` that are missing or mean something else than a fresh generation."""
    fresh = generate(proto_root)
    return [name for name, text in fresh.items()
            if not (wire_dir / name).exists() or meaning((wire_dir / name).read_text()) != meaning(text)]


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proto-root", type=Path, default=root / "proto")
    parser.add_argument("--wire-dir", type=Path, default=root / "common" / "wire")
    parser.add_argument("--check", action="store_true", help="exit 1 if committed stubs are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stubs(args.proto_root, args.wire_dir)
        if stale:
            print(f"stale generated stubs: {', '.join(stale)}; run `make proto`", file=sys.stderr)
            return 1
        return 0
    for name, text in generate(args.proto_root).items():
        (args.wire_dir / name).write_text(text)
        print(f"wrote {args.wire_dir / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
