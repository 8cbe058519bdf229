"""One logging set-up for every fedcmp process: text for people, JSON lines for log pipelines.

`--log-format text` (default): `time level component: message`. `--log-format json`: one JSON
object per line with `time` (UTC, ISO 8601), `level`, `logger`, `message` and, for a logged
exception, `exception` (the traceback as one string), so a record never spans lines.

transformers' own log records go through the same handler, and off a terminal its loading
progress bars (and huggingface_hub's) are switched off: a container log holds log lines only.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Literal

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[str, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LIBRARIES = ("grpc", "asyncio", "urllib3", "PIL", "matplotlib", "httpx", "filelock")


class JsonFormatter(logging.Formatter):
    """A log record as one line of JSON."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(verbose: bool = False, log_format: LogFormat = "text") -> None:
    """Configure the root logger once per process (level from `verbose` or `$FEDCMP_LOG_LEVEL`)."""
    level = logging.DEBUG if verbose else getattr(logging, os.environ.get("FEDCMP_LOG_LEVEL", "INFO").upper(),
                                                   logging.INFO)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter(TEXT_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in QUIET_LIBRARIES:
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
    _adopt_transformers_logging()  # before any model module is imported: some warn at import time


def _adopt_transformers_logging() -> None:
    """transformers logs through our handler (not its own `[transformers] ...` one); no bars off a terminal."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # a coordinator-only install may lack it
        return

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    if not sys.stderr.isatty():
        transformers_logging.disable_progress_bar()
