"""`fedcmp-export`: a trained projector as LLaVA's mm_projector files and a transformers Llava directory.

    fedcmp-export runs/server --out runs/export               # the latest committed global
    fedcmp-export runs/server --round 4 --out runs/export-r4
    fedcmp-export projector.safetensors --out runs/export --format llava
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedcmp.common.cliflags import add_common_flags
from fedcmp.common.constants import EXIT_OK, EXIT_USAGE
from fedcmp.common.logs import setup_logging
from fedcmp.export.api import FORMATS, export_projector
from fedcmp.export.source import ExportError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedcmp-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a coordinator state dir, or a projector .safetensors file")
    parser.add_argument("--out", type=Path, required=True, help="folder to write llava/ and transformers/ into")
    parser.add_argument("--round", type=int, dest="round_index",
                        help="export this round's global from a state dir (default: the latest committed)")
    parser.add_argument("--format", action="append", choices=FORMATS, dest="formats",
                        help="repeatable; default: every format the projector fits (a linear projector: llava)")
    parser.add_argument("--vision-model", help="local path or id of the vision tower (default: the one the projector "
                                               "metadata names; its fingerprint must match)")
    parser.add_argument("--llm", help="local path or id of the LLM (default: as the metadata names it)")
    parser.add_argument("--cache-dir", type=Path, help="micro zoo and fingerprint cache (default $FEDCMP_CACHE or "
                                                       "~/.cache/fedcmp)")
    add_common_flags(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(log_format=args.log_format)
    try:
        written = export_projector(args.source, args.out, tuple(args.formats) if args.formats else None,
                                   args.round_index, args.vision_model, args.llm, args.cache_dir)
    except ExportError as error:
        print(f"fedcmp-export: {error}", file=sys.stderr)
        return EXIT_USAGE
    for name, paths in written.items():
        print(f"{name}: {', '.join(str(path) for path in paths)}")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
