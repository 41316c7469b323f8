"""End to end: live reconfiguration of real processes (SIGHUP, POST /reload) and IPv6.

A herd grows by one link without a restart, loses it again, keeps running on a bad
config, reports what needs a restart, and answers POST /reload with what changed.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from tests.e2e.herd import Herd, connect, free_ports, poll, read_until_close, running

DEADLINE = 20.0  # seconds any one step may take on a busy 2-core machine


def now() -> bytes:
    return b"%.9f" % time.time()


def reload(herd: Herd, *names: str) -> None:
    for name in names:
        herd.processes[name].send_signal(signal.SIGHUP)


async def test_sighup_links_an_added_neighbour_and_unlinks_it_again(tmp_path: Path) -> None:
    names = ["Alpha", "Beta", "Gamma"]
    with running(Herd.create(tmp_path, names, [("Alpha", "Beta")])) as herd:
        await herd.start_all()
        first = await herd.iamat("Alpha", b"before", b"+1+1", now())
        herd.edges.append(("Beta", "Gamma"))  # edit one side's config, reload both ends
        herd.write_config()
        reload(herd, "Beta", "Gamma")
        await herd.wait_logged("Beta", "reloaded: linked Gamma", deadline=DEADLINE)
        await herd.wait_logged("Gamma", "reloaded: linked Beta", deadline=DEADLINE)
        await herd.wait_linked(["Beta", "Gamma"])
        await herd.wait_for("Gamma", b"before", first, deadline=DEADLINE)  # caught up
        later = await herd.iamat("Alpha", b"later", b"+2+2", now())
        await herd.wait_for("Gamma", b"later", later, deadline=DEADLINE)  # gets new ones

        herd.edges.remove(("Beta", "Gamma"))
        herd.write_config()
        reload(herd, "Gamma")  # first the accepting side: it closes the link and refuses
        await herd.wait_logged("Gamma", "reloaded: unlinked Beta", deadline=DEADLINE)
        await herd.wait_logged("Gamma", "refused peer connection from", deadline=DEADLINE)
        reload(herd, "Beta")  # then the dialling side stops dialling
        await herd.wait_logged("Beta", "reloaded: unlinked Gamma", deadline=DEADLINE)
        after = await herd.iamat("Alpha", b"after", b"+3+3", now())
        await herd.wait_for("Beta", b"after", after, deadline=DEADLINE)
        reply = await herd.whatsat("Gamma", b"after", b"1", b"0")
        assert reply.startswith(b"? "), reply  # no longer a neighbour: nothing flows
        assert all(herd.running(name) for name in names)


async def test_bad_config_and_fixed_settings_on_reload_keep_the_running_ones(
    tmp_path: Path,
) -> None:
    with running(Herd.create(tmp_path, ["Solo"], [])) as herd:
        await herd.start_all()
        good = herd.config.read_text()
        herd.config.write_text(good + "\n[servers.Solo.oops]\n")
        reload(herd, "Solo")
        log = await herd.wait_logged("Solo", "reload failed", deadline=DEADLINE)
        assert f"reload failed, the running config stays: {herd.config}: " in log
        moved = free_ports(1)[0]
        herd.config.write_text(good.replace(f"port = {herd.ports['Solo']}", f"port = {moved}"))
        reload(herd, "Solo")
        log = await herd.wait_logged("Solo", "NOT changed", deadline=DEADLINE)
        assert "servers.Solo.port" in log
        reply = await herd.iamat("Solo", b"still", b"+1+1", now())  # on the old port
        assert reply.startswith(b"AT Solo ")
        assert herd.running("Solo")


async def test_post_reload_answers_what_changed(tmp_path: Path) -> None:
    with running(Herd.create(tmp_path, ["Alpha", "Beta"], []).with_admin()) as herd:
        await herd.start_all()
        async with httpx.AsyncClient(timeout=DEADLINE) as client:
            url = herd.admin_url("Alpha") + "/reload"
            assert (await client.get(url)).status_code == 405
            herd.edges.append(("Alpha", "Beta"))
            herd.write_config()
            answer = await client.post(url)
            assert answer.status_code == 200, answer.text
            assert answer.json()["servers"]["Alpha"]["linked"] == ["Beta"]
            reload(herd, "Beta")
            await herd.wait_linked()
            ready_url = herd.admin_url("Alpha") + "/readyz?links=all"

            async def ready() -> bool | None:
                answer = await client.get(ready_url)
                return True if answer.status_code == 200 else None

            await poll("Alpha ready with its new link", ready, deadline=DEADLINE)
            state = (await client.get(herd.admin_url("Alpha") + "/state")).json()
            assert [link["peer"] for link in state["links"]] == ["Beta"]
            herd.config.write_text("not toml [")
            answer = await client.post(url)
            assert answer.status_code == 400
            assert answer.json()["ok"] is False
            assert "invalid TOML" in answer.json()["error"]


async def test_post_reload_needs_the_token_when_one_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Token-protected like every admin path but /healthz (admin_token_env set)."""
    monkeypatch.setenv("HERD_TEST_ADMIN_TOKEN", "s3cret")
    with running(Herd.create(tmp_path, ["Solo"], [])) as herd:
        port = free_ports(1)[0]
        token = 'admin_token_env = "HERD_TEST_ADMIN_TOKEN"'
        herd.config.write_text(herd.config.read_text() + f"admin_port = {port}\n{token}\n")
        herd.start("Solo")
        await (await connect(herd.ports["Solo"], deadline=DEADLINE)).aclose()
        async with httpx.AsyncClient(timeout=DEADLINE) as client:
            url = f"http://127.0.0.1:{port}/reload"
            await poll("admin up", lambda: _status(client, url.replace("reload", "healthz")))
            assert (await client.post(url)).status_code == 401
            answer = await client.post(url, headers={"authorization": "Bearer s3cret"})
            assert answer.status_code == 200
            assert answer.json()["ok"] is True


async def _status(client: httpx.AsyncClient, url: str) -> bool | None:
    try:
        return (await client.get(url)).status_code == 200 or None
    except httpx.TransportError:
        return None


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


async def exchange6(port: int, payload: bytes) -> bytes:
    """Send `payload` to [::1]:`port`, half-close; all the server answered."""
    stream = await poll(f"connect to [::1]:{port}", partial(_dial6, port), deadline=DEADLINE)
    async with stream:
        await stream.send_all(payload)
        await stream.send_eof()
        return await read_until_close(stream, deadline=DEADLINE)


async def _dial6(port: int) -> trio.SocketStream | None:
    try:
        return await trio.open_tcp_stream("::1", port)
    except OSError:
        return None


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this host")
async def test_ipv6_herd_links_and_logs_bracketed_addresses(tmp_path: Path) -> None:
    """Two servers on ::1 (one listening on `::`): linked, records flow, logs say [::1]."""
    with running(Herd.create(tmp_path, ["Alpha", "Beta"], [("Alpha", "Beta")])) as herd:
        text = herd.config.read_text()
        text = text.replace("[servers.Alpha]\n", '[servers.Alpha]\nhost = "::1"\n')
        text = text.replace("[servers.Beta]\n", '[servers.Beta]\nhost = "::1"\nlisten = "::"\n')
        herd.config.write_text(text)
        for name in herd.names:
            herd.start(name)
        await herd.wait_linked()
        log = herd.log("Alpha").read_text()
        assert f"link to Beta up ([::1]:{herd.peer_ports['Beta']})" in log
        assert f"listening for clients on [::1]:{herd.ports['Alpha']}" in log
        beta = herd.log("Beta").read_text()
        assert f"(neighbours dial [::1]:{herd.peer_ports['Beta']})" in beta
        assert "link from Alpha up ([::1]:" in beta
        at = await exchange6(herd.ports["Alpha"], b"IAMAT six +1+1 %s\n" % now())
        assert at.startswith(b"AT Alpha ")

        async def arrived() -> bool | None:
            reply = await exchange6(herd.ports["Beta"], b"WHATSAT six 1 0\n")
            return True if reply.startswith(at) else None

        await poll("Beta holds the record", arrived, deadline=DEADLINE)


async def test_sighup_under_all_reloads_every_server_with_the_process_secret(
    tmp_path: Path,
) -> None:
    """`--all` with no secret configured makes one random secret; a reload keeps it, so
    a link added by the reload authenticates, and one SIGHUP reaches every server."""
    with running(Herd.create(tmp_path, ["Alpha", "Beta"], [])) as herd:
        process = herd.processes["all"] = launch_all(herd)
        for name in herd.names:
            await (await connect(herd.ports[name], deadline=DEADLINE)).aclose()
        herd.edges.append(("Alpha", "Beta"))
        herd.write_config()
        process.send_signal(signal.SIGHUP)
        await herd.wait_logged("Alpha", "reloaded: linked Beta", deadline=DEADLINE)
        await herd.wait_logged("Beta", "reloaded: linked Alpha", deadline=DEADLINE)
        await herd.wait_linked()
        at = await herd.iamat("Alpha", b"all", b"+1+1", now())
        await herd.wait_for("Beta", b"all", at, deadline=DEADLINE)


def launch_all(herd: Herd) -> subprocess.Popen[bytes]:
    """`python -m herd_trio --all` for `herd`'s config."""
    command = [sys.executable, "-m", "herd_trio", "--all", "--config", str(herd.config)]
    return subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
