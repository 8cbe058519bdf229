"""Flags every fedcmp command has: `--version` and `--log-format`."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from fedcmp.common.logs import LOG_FORMATS
from fedcmp.common.version import describe_build


class _PrintVersion(argparse.Action):
    """Print the build on one line (argparse's own version action wraps it to the terminal width) and exit 0."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        print(describe_build(parser.prog))
        parser.exit()


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """`--version` (fedcmp's and the key libraries' versions) and `--log-format text|json`."""
    parser.add_argument("--version", action=_PrintVersion, nargs=0, help="print the versions and exit")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="text (default) or json: one JSON object per log line, for log pipelines")
