"""Logging and the flags every command shares: JSON lines, --log-format, --version."""
from __future__ import annotations

import importlib
import json
import logging

import pytest

from fedcmp.common.logs import JsonFormatter, setup_logging
from fedcmp.common.version import fedcmp_version

COMMANDS = {"fedcmp-server": "fedcmp.server.cli", "fedcmp-client": "fedcmp.client.cli",
            "fedcmp-status": "fedcmp.server.status_cli", "fedcmp-data": "fedcmp.common.datagen",
            "fedcmp-sim": "fedcmp.sim.cli", "fedcmp-export": "fedcmp.export.cli"}


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_json_record_is_one_line_with_its_exception(restore_logging, capsys) -> None:
    setup_logging(log_format="json")
    log = logging.getLogger("fedcmp.test")
    log.info("round %d committed", 3)
    try:
        raise ValueError("bad\nupload")
    except ValueError:
        log.exception("aggregation failed")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "round 3 committed" and first["level"] == "INFO" and first["logger"] == "fedcmp.test"
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert "ValueError: bad\nupload" in second["exception"]


def test_the_text_format_is_unchanged(restore_logging, capsys) -> None:
    setup_logging(log_format="text")
    logging.getLogger("fedcmp.test").warning("careful")
    assert capsys.readouterr().err.strip().endswith("WARNING fedcmp.test: careful")


def test_transformers_logs_through_our_handler(restore_logging, capsys) -> None:
    from transformers.utils import logging as transformers_logging

    setup_logging(log_format="json")
    transformers_logging.get_logger("transformers.test").warning("advice")
    record = json.loads(capsys.readouterr().err.strip())
    assert record["logger"] == "transformers.test" and record["message"] == "advice"


@pytest.mark.parametrize("prog, module", COMMANDS.items())
def test_every_command_has_version_and_log_format(prog, module, capsys) -> None:
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"{prog} {fedcmp_version()} (python ") and "torch" in printed
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--log-format {text,json}" in capsys.readouterr().out
