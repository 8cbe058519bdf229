"""One logging format for every fedcmp process: time, level, component, message (key=value pairs)."""
from __future__ import annotations

import logging
import os

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else getattr(logging, os.environ.get("FEDCMP_LOG_LEVEL", "INFO").upper(), logging.INFO)
    logging.basicConfig(level=level, format=FORMAT, datefmt="%Y-%m-%dT%H:%M:%S")
    for noisy in ("grpc", "asyncio", "urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
