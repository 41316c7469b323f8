"""deploy/herd-trio@.service: systemd accepts it, and its command line is one this
program takes (parsed by the real argument parser, with %i as a server name)."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from herd_trio.__main__ import parse_args

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "herd-trio@.service"
PYTHON = "/opt/herd-trio/venv/bin/python"  # where docs/operations.md installs it


def service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    assert set(parser.sections()) == {"Unit", "Service", "Install"}
    return parser["Service"]


def test_the_unit_runs_one_server_named_by_the_instance() -> None:
    unit = service()
    argv = shlex.split(unit["ExecStart"])
    assert argv[:3] == [PYTHON, "-m", "herd_trio"]
    args = parse_args([arg.replace("%i", "Clark") for arg in argv[3:]])
    assert args.name == "Clark"
    assert str(args.config) == "/etc/herd-trio/herd.toml"
    assert not args.all


def test_the_unit_reloads_with_sighup_and_stops_with_sigterm() -> None:
    unit = service()
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert unit["KillSignal"] == "SIGTERM"
    assert unit["RestartPreventExitStatus"] == "2"  # a bad config: restarting cannot help
    assert unit["Restart"] == "on-failure"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` on an instance, the interpreter pointed at this one (verify
    checks that ExecStart's program exists); any warning fails the test too."""
    text = UNIT.read_text(encoding="utf-8").replace(PYTHON, str(Path(sys.executable).resolve()))
    instance = tmp_path / "herd-trio@Clark.service"
    instance.write_text(text, encoding="utf-8")
    done = subprocess.run(
        ["systemd-analyze", "verify", str(instance)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
    assert done.stderr.strip() == ""
