"""The docs run as written: every TOML block loads, documented commands work.

Every ```toml block of README.md and docs/*.md is written to a file and loaded through
the real loader. A block that is deliberately a fragment (a few `[herd]` settings) says
so with `<!-- fragment -->` on the line before its fence; it is then completed with one
minimal server. Files and variables a block names (a keyring file, certificates, a secret
variable) are made first, as the text around the block tells the reader to.

The commands a test can run are run: the README's install-and-test command is the one
CI runs, `--help` and `--version`, the documented config error, and the README's
telnet and nc session against the user guide's herd on free ports, stopped with the
guide's `kill $(lsof -ti:PORT)`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import attrs
import pytest
import trio
import trustme

from herd_trio import config
from tests.e2e.herd import connect, exchange, free_ports, poll, require_program

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FRAGMENT = "<!-- fragment -->"
TOML_BLOCK = re.compile(r"^```toml\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# What completes a fragment: one server, so that the `[herd]` settings are loaded for real.
MINIMAL_SERVER = "\n[servers.Solo]\nport = 12900\npeer_port = 12901\n"
SECRET = "0123456789abcdef0123456789abcdef"  # 32 bytes, over the 16-byte minimum
STOP_DEADLINE = 5.0  # seconds: PROTOCOL.md §5 allows 3 s to stop; margin for a busy machine


@attrs.frozen
class Block:
    doc: Path
    line: int
    text: str
    fragment: bool

    def __str__(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def toml_blocks() -> list[Block]:
    """Every ```toml block of the docs, with where it is and whether it is a fragment."""
    blocks = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in TOML_BLOCK.finditer(text):
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            line = text.count("\n", 0, match.start()) + 1
            blocks.append(Block(doc, line, match[1], before.strip() == FRAGMENT))
    return blocks


def guide_config() -> str:
    """The user guide's config example (the built-in herd written out as a file)."""
    [block] = [b for b in toml_blocks() if b.doc.name == "user-guide.md"]
    return block.text


def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def command_after(text: str, heading: str) -> str:
    """The first indented command line after the paragraph that ends with `heading`."""
    after = text[text.index(heading) + len(heading) :]
    match = re.search(r"^    (\S.*)$", after, re.MULTILINE)
    assert match is not None, f"no command after {heading!r}"
    return match[1]


def provide_what_it_names(raw: dict[str, object], folder: Path, environ: dict[str, str]) -> None:
    """Make the secret variable, keyring file and certificates that a config names."""
    settings = raw.get("herd", {})
    assert isinstance(settings, dict)
    if name := settings.get("secret_env"):
        environ[name] = SECRET
    if keyring := settings.get("keyring_file"):
        (folder / keyring).write_text(f"# herd peer secrets\n{SECRET}\n{SECRET[::-1]}\n")
    servers = raw.get("servers", {})
    assert isinstance(servers, dict)
    ca = trustme.CA()
    if tls_ca := settings.get("tls_ca"):
        (folder / tls_ca).parent.mkdir(parents=True, exist_ok=True)
        ca.cert_pem.write_to_path(str(folder / tls_ca))
    for names, table in [(list(servers), settings), *((([n], t) for n, t in servers.items()))]:
        if table.get("tls_cert"):
            cert = ca.issue_cert(*names)
            (folder / table["tls_cert"]).parent.mkdir(parents=True, exist_ok=True)
            cert.cert_chain_pems[0].write_to_path(str(folder / table["tls_cert"]))
            cert.private_key_pem.write_to_path(str(folder / table["tls_key"]))


@pytest.mark.parametrize("block", toml_blocks(), ids=str)
def test_every_toml_block_in_the_docs_loads(block: Block, tmp_path: Path) -> None:
    text = block.text
    raw = tomllib.loads(text)
    if block.fragment:
        assert "servers" not in raw, f"{block}: a fragment with servers can stand alone"
        text += MINIMAL_SERVER
    else:
        assert "servers" in raw, f"{block}: no [servers.NAME]; mark it {FRAGMENT} if on purpose"
    environ = dict(os.environ)
    provide_what_it_names(tomllib.loads(text), tmp_path, environ)
    path = tmp_path / "herd.toml"
    path.write_text(text, encoding="utf-8")
    herd = config.load(path, environ=environ)
    assert set(herd.servers) == set(tomllib.loads(text)["servers"])


def test_fragments_stay_rare() -> None:
    blocks = toml_blocks()
    assert len(blocks) >= 4
    assert sum(b.fragment for b in blocks) <= len(blocks) // 2


def test_the_guides_config_is_the_built_in_herd(tmp_path: Path) -> None:
    path = tmp_path / "herd.toml"
    path.write_text(guide_config(), encoding="utf-8")
    assert config.load(path).servers == config.load(None).servers


def test_the_readme_test_command_is_what_ci_runs() -> None:
    install_and_test = command_after(readme(), "Install and run the tests:")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert install_and_test in ci
    # PEP 668: a stock Debian/Ubuntu python3 refuses `pip install` outside a venv.
    install_and_run = command_after(readme(), "Install and run the default five-server herd")
    for command in (install_and_run, install_and_test):
        assert command.startswith("python3 -m venv .venv && .venv/bin/pip install "), command


# A documented command line that installs with the system's pip: `pip install x`,
# `python3 -m pip install x`, `$ sudo pip3 install x` (but not `.venv/bin/pip install`).
INSTALL_OUTSIDE_VENV = re.compile(r"^ {4}(\$ )?(sudo )?(python3? -m )?pip3? install")


def test_no_doc_installs_into_the_system_python() -> None:
    for doc in DOCS:
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            assert not INSTALL_OUTSIDE_VENV.match(line), f"{doc.name}:{number}: {line}"


async def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "herd_trio", *args],
        cwd=cwd,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_help_lists_every_documented_option(tmp_path: Path) -> None:
    usage = re.findall(r"^    python3 -m herd_trio (NAME|--all) (.*)$", readme(), re.MULTILINE)
    assert len(usage) == 2
    documented = set(re.findall(r"--[a-z-]+", " ".join(rest for _, rest in usage)))
    assert documented >= {"--config", "--log-dir", "--one-shot"}
    result = await run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr == b""
    for option in documented | {"--all"}:
        assert option.encode() in result.stdout, option


async def test_version_prints_the_installed_version(tmp_path: Path) -> None:
    assert "    python3 -m herd_trio --version\n" in readme()
    expected = f"herd_trio {metadata.version('herd_trio')}\n".encode()
    result = await run_cli("--version", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, expected, b"")
    # The console script the README documents is the same command.
    script = Path(sys.executable).parent / "herd-trio"
    assert "`herd-trio`" in readme()
    result = await trio.run_process([script, "--version"], capture_stdout=True, cwd=tmp_path)
    assert result.stdout == expected


async def test_the_documented_config_error_is_what_the_user_sees(tmp_path: Path) -> None:
    guide = (ROOT / "docs" / "user-guide.md").read_text(encoding="utf-8")
    assert 'port = "12003"' in guide
    text = guide_config().replace("port = 12003 ", 'port = "12003"', 1)
    assert text != guide_config()
    (tmp_path / "herd.toml").write_text(text, encoding="utf-8")
    result = await run_cli("Clark", "--config", "herd.toml", cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.decode().splitlines()
    assert f"`{line}`" in guide


def on_free_ports(text: str) -> tuple[str, dict[int, int]]:
    """`text` with every port number of 12000-12204 (client, peer and admin ports) moved to a free
    port; the mapping."""
    documented = sorted({int(p) for p in re.findall(r"\b(12[012]0[0-9])\b", text)})
    moved = dict(zip(documented, free_ports(len(documented)), strict=True))
    return re.sub(r"\b(12[012]0[0-9])\b", lambda m: str(moved[int(m[1])]), text), moved


@pytest.fixture
def nc_and_lsof() -> None:
    """Skip (or fail under HERD_REQUIRE_ALL=1) without nc or lsof.

    A fixture, not a call in the test: a skip raised inside a trio test reaches pytest
    through the test's nursery and loses its reason.
    """
    require_program("nc", "lsof")


@pytest.mark.usefixtures("nc_and_lsof")
async def test_the_readme_session_against_the_guides_herd(tmp_path: Path) -> None:
    """README's telnet IAMAT and nc WHATSAT, on the guide's herd (ports moved to free ones),
    stopped by the guide's `kill $(lsof -ti:12003)`, which under --all stops all five."""
    text, moved = on_free_ports(guide_config())
    (tmp_path / "herd.toml").write_text(text, encoding="utf-8")
    herd = await trio.lowlevel.open_process(
        [sys.executable, "-m", "herd_trio", "--all", "--config", "herd.toml"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    assert herd.stdout is not None
    try:
        for port in range(12000, 12005):
            await (await connect(moved[port], deadline=10)).aclose()
        session = readme()[readme().index("$ telnet 127.0.0.1 12003") :]
        iamat = re.search(r"^    (IAMAT .*)$", session, re.MULTILINE)
        documented_at = re.search(r"^    (AT Clark .*)$", session, re.MULTILINE)
        assert iamat is not None
        assert documented_at is not None
        at_line = await exchange(moved[12003], iamat[1].encode() + b"\r\n")  # as telnet sends
        assert at_line.split(b" ")[:2] == [b"AT", b"Clark"]
        assert at_line.endswith(b"\n")
        assert at_line[:-1].split(b" ")[3:] == documented_at[1].encode().split(b" ")[3:]

        nc_line = re.search(r"^    \$ (printf .* \| nc -N 127\.0\.0\.1 12000)$", session, re.M)
        assert nc_line is not None
        command = nc_line[1].replace(" 12000", f" {moved[12000]}")

        async def whatsat() -> bytes | None:
            reply = await shell(command)
            return reply if reply.startswith(at_line) else None

        # The flood reaches Bailey (two links away) within milliseconds.
        reply = await poll("Bailey's WHATSAT reply with Clark's AT line", whatsat)
        body = json.loads(reply[len(at_line) :])
        assert body["status"] == "OK"
        assert 1 <= len(body["results"]) <= 2
        assert reply.endswith(b"}\n\n")

        await shell(f"kill $(lsof -ti:{moved[12003]})")  # "stops all five" (user guide)
        with trio.fail_after(STOP_DEADLINE):
            assert await herd.wait() == 0
            printed = b"".join([chunk async for chunk in herd.stdout]).decode()
        for port in range(12000, 12005):
            with pytest.raises(OSError, match="all attempts to connect"):
                await (await trio.open_tcp_stream("127.0.0.1", moved[port])).aclose()
        for name, port in [("Bailey", 12000), ("Clark", 12003), ("Jaquez", 12004)]:
            assert f"{name}: clients on 127.0.0.1:{moved[port]}" in printed
    finally:
        herd.kill()  # a no-op when it has exited
        with trio.CancelScope(shield=True), trio.move_on_after(STOP_DEADLINE):
            await herd.wait()
            await herd.stdout.aclose()


async def shell(command: str) -> bytes:
    """Run one documented shell line as a user would; its standard output."""
    result = await trio.run_process(["bash", "-c", command], capture_stdout=True)
    return result.stdout
