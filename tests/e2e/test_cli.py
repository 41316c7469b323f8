"""The command line as a user meets it: --version, config errors, where logs and state go."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import pytest

from tests.e2e.herd import Herd, connect
from tests.e2e.herd import run_cli as run_herd_cli

TWO = """
[servers.A]
port = 1
peer_port = 2
neighbours = ["B"]

[servers.B]
port = 3
peer_port = 4
"""


# No HERD_* or GOOGLE_* variables from the caller.
CLEAN_ENV = {"PATH": "/usr/bin:/bin"}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m herd_trio ARGS` with a clean environment, expected to exit by itself."""
    return run_herd_cli(*args, cwd=cwd, env=CLEAN_ENV)


def test_version_prints_the_package_version(tmp_path: Path) -> None:
    result = run_cli("--version", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"herd_trio {metadata.version('herd_trio')}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (TWO + "colour = 1\n", "servers.B.colour: unknown key"),
        (TWO.replace("port = 1\n", "port = 'one'\n"), "servers.A.port: expected int, got str"),
        ("[herd]\nmax_line = 10\n" + TWO, "herd.max_line: expected int >= 64"),
        (TWO.replace('["B"]', '["C"]'), "servers.A.neighbours: unknown server 'C'"),
        (
            TWO.replace("port = 3", "port = 1"),
            "servers.B.port: 1 is already used by servers.A.port",
        ),
        (
            TWO.replace("port = 3", "host = '127.0.0.300'\nport = 3"),
            "servers.B.host: '127.0.0.300' is neither an IP address nor a valid host name",
        ),
        ("[herd]\nsecret_env = 'HERD_UNSET'\n" + TWO, "herd.secret_env: $HERD_UNSET is not set"),
        (
            "[herd]\nkeyring_file = 'keys'\n" + TWO,
            "herd.keyring_file: cannot read '{dir}/keys': No such file or directory",
        ),
        (
            "[herd]\ntls_cert = 'c.pem'\ntls_key = 'k.pem'\ntls_ca = 'ca.pem'\n" + TWO,
            "herd.tls_ca: cannot load '{dir}/ca.pem': ",
        ),
        ("[servers.A\n", "invalid TOML: "),
    ],
)
def test_a_bad_config_exits_2_with_one_line_starting_with_the_file(
    tmp_path: Path, text: str, expected: str
) -> None:
    (tmp_path / "bad.toml").write_text(text)
    result = run_cli("--config", "bad.toml", "A", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("bad.toml: " + expected.format(dir=tmp_path)), result.stderr
    assert result.stdout == ""


@contextmanager
def launched(*args: str, cwd: Path) -> Iterator[subprocess.Popen[str]]:
    """`python -m herd_trio ARGS` in the background; SIGKILLed if still running at the end."""
    process = subprocess.Popen(
        [sys.executable, "-m", "herd_trio", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def stop(process: subprocess.Popen[str]) -> str:
    """SIGTERM, then everything the process printed on stdout; it must exit 0 quietly."""
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=10)
    assert (process.returncode, err) == (0, ""), err
    return out


async def test_all_keeps_state_beside_the_config_whatever_the_log_dir(tmp_path: Path) -> None:
    """Issue 10 #4: a restart of --all with another --log-dir still has the record."""
    herd = Herd.create(tmp_path / "conf", ["Solo"], [])
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    state = tmp_path / "conf" / "state"
    config = str(herd.config)
    with launched("--all", "--config", config, "--log-dir", "../logs-a", cwd=elsewhere) as first:
        await (await connect(herd.ports["Solo"])).aclose()
        at_line = await herd.iamat("Solo", b"kiwi", b"+34.068930-118.445127", b"1621464827.5")
        out = stop(first)
    assert f"logs: {tmp_path / 'logs-a'}\n" in out
    assert f"state: {state}\n" in out
    log = (tmp_path / "logs-a" / "Solo.log").read_text()
    assert f"log file {tmp_path / 'logs-a' / 'Solo.log'}; state file {state / 'Solo'}" in log
    assert (state / "Solo.records").exists()

    with launched("--all", "--config", config, "--log-dir", "../logs-b", cwd=elsewhere) as second:
        await (await connect(herd.ports["Solo"])).aclose()
        reply = await herd.whatsat("Solo", b"kiwi", b"1", b"0")
        out = stop(second)
    assert reply.startswith(at_line), reply
    assert f"logs: {tmp_path / 'logs-b'}\n" in out
    assert f"state: {state}\n" in out


async def test_one_server_prints_where_its_log_goes_and_that_it_keeps_no_state(
    tmp_path: Path,
) -> None:
    herd = Herd.create(tmp_path, ["Solo"], [])
    with launched("Solo", "--config", str(herd.config), cwd=tmp_path) as process:
        await (await connect(herd.ports["Solo"])).aclose()
        out = stop(process)
    assert out.splitlines()[:2] == [
        f"logs: {tmp_path / 'logs'}",
        "state: none (records live in memory only; set state_dir or --state-dir)",
    ]
    assert (
        f"log file {tmp_path / 'logs' / 'Solo.log'}; state file none"
        in herd.log("Solo").read_text()
    )


def test_a_host_that_does_not_resolve_is_a_start_up_error_naming_server_and_host(
    tmp_path: Path,
) -> None:
    """Syntax is checked at load time (exit 2); resolving is the bind's job (exit 1)."""
    herd = Herd.create(tmp_path, ["Solo"], [])
    text = herd.config.read_text().replace(
        "[servers.Solo]", "[servers.Solo]\nhost = 'herd.invalid'"
    )
    herd.config.write_text(text)
    result = run_cli("Solo", "--config", str(herd.config), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    port = herd.ports["Solo"]
    assert result.stderr.startswith(
        f"herd_trio: Solo: cannot listen for clients on herd.invalid:{port}: "
    )
