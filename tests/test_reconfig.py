"""Listen/advertise addresses, IPv6 in logs, and live reconfiguration (herd_trio/reconfig.py)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import msgspec
import pytest
import trio

from herd_trio.config import ConfigError, HerdConfig, load
from herd_trio.links import Peer
from herd_trio.net import host_of, hostport, is_loopback_host
from herd_trio.reconfig import Changes, Links, Reloader, dialled, dialling, fixed_changes
from herd_trio.reconfig import describe as describe_changes
from herd_trio.security import PeerSecurity
from tests.helpers import herd_config, make_node, peer_port


def write(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "herd.toml"
    path.write_text(f"[servers.Alpha]\nport = 12000\npeer_port = 12100\n{server}\n")
    return path


# --- listen beside host ------------------------------------------------------------


def test_listen_defaults_to_host(tmp_path: Path) -> None:
    herd = load(write(tmp_path, 'host = "10.77.0.1"'))
    assert herd.servers["Alpha"].bind == "10.77.0.1"


def test_listen_wildcard_with_an_advertised_address(tmp_path: Path) -> None:
    herd = load(write(tmp_path, 'host = "10.77.0.1"\nlisten = "0.0.0.0"'))
    cfg = herd.servers["Alpha"]
    assert (cfg.host, cfg.bind) == ("10.77.0.1", "0.0.0.0")


def test_ipv6_literals_are_taken(tmp_path: Path) -> None:
    herd = load(write(tmp_path, 'host = "fd77::1"\nlisten = "::"'))
    assert (herd.servers["Alpha"].host, herd.servers["Alpha"].bind) == ("fd77::1", "::")


@pytest.mark.parametrize(
    ("server", "field", "problem"),
    [
        ('host = "[::1]"', "servers.Alpha.host", "without brackets"),
        ('listen = "[::]"', "servers.Alpha.listen", "without brackets"),
        ('listen = "10.77.0.300"', "servers.Alpha.listen", "neither an IP address"),
        ('host = "0.0.0.0"\nlisten = "::"', "servers.Alpha.host", "cannot be dialled"),
    ],
)
def test_bad_addresses_name_the_field(
    tmp_path: Path, server: str, field: str, problem: str
) -> None:
    path = write(tmp_path, server)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value).startswith(f"{path}: {field}: ")
    assert problem in str(caught.value)


def test_servers_on_other_machines_may_share_ports(tmp_path: Path) -> None:
    """With listen set, `host` says which machine: the same ports on two are fine."""
    text = "".join(
        f"[servers.S{i}]\nport = 12000\npeer_port = 12100\nadmin_port = 12200\n"
        f'host = "10.77.0.{i}"\nlisten = "0.0.0.0"\n'
        for i in (1, 2)
    )
    path = tmp_path / "herd.toml"
    path.write_text(text)
    assert set(load(path).servers) == {"S1", "S2"}


def test_a_wildcard_listen_clashes_on_its_own_machine(tmp_path: Path) -> None:
    text = (
        '[servers.Alpha]\nport = 12000\npeer_port = 12100\nhost = "10.77.0.1"\nlisten = "::"\n'
        '[servers.Beta]\nport = 12000\npeer_port = 12101\nhost = "10.77.0.1"\n'
        'listen = "10.77.0.1"\n'
    )
    path = tmp_path / "herd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"servers\.Beta\.port: 12000 is already used"):
        load(path)


def test_hostport_brackets_ipv6_and_host_of_undoes_it() -> None:
    assert hostport("::1", 12000) == "[::1]:12000"
    assert hostport("10.77.0.1", 12000) == "10.77.0.1:12000"
    assert host_of("[fd77::1]:4000") == "fd77::1"
    assert host_of("10.77.0.1:4000") == "10.77.0.1"


# --- what a reload changes -----------------------------------------------------------


def test_dialled_and_dialling_split_the_neighbours_by_name_order() -> None:
    herd = herd_config()  # Alpha-Beta, Alpha-Gamma, Beta-Gamma; Delta alone
    assert set(dialled(herd, "Beta")) == {"Gamma"}
    assert dialled(herd, "Beta")["Gamma"] == Peer("Gamma", "127.0.0.1", 12102)
    assert dialling(herd, "Beta") == {"Alpha"}
    assert dialled(herd, "Delta") == {}
    assert dialling(herd, "Delta") == frozenset()


def test_fixed_changes_lists_only_what_cannot_change_live() -> None:
    old = herd_config()
    servers = {name: msgspec.to_builtins(cfg) for name, cfg in old.servers.items()}
    servers["Beta"]["port"] = 13001
    servers["Beta"]["neighbours"] = ["Gamma", "Delta"]
    new = herd_config(servers, heartbeat_interval=0.5, keyring_file="keys")
    assert fixed_changes(old, new, "Beta") == ["servers.Beta.port", "herd.heartbeat_interval"]
    assert fixed_changes(old, new, "Alpha") == ["herd.heartbeat_interval"]


def test_describe_says_links_and_what_waits_for_a_restart() -> None:
    changes = Changes(("Delta",), ("Gamma",), (), ("servers.Beta.port",))
    said = describe_changes(changes)
    assert said.startswith("linked Delta; unlinked Gamma; NOT changed")
    assert "servers.Beta.port" in said
    assert describe_changes(Changes()) == "no link changes"
    assert changes.as_json()["linked"] == ["Delta"]


async def test_links_apply_dials_added_and_hangs_up_removed(tmp_path: Path) -> None:
    """A reload that adds Delta to Beta's neighbours dials it; removing it cancels the link
    task, whose bus subscription goes with it."""
    old = herd_config()
    servers = {name: msgspec.to_builtins(cfg) for name, cfg in old.servers.items()}
    servers["Beta"]["neighbours"] = ["Gamma", "Delta"]
    servers["Delta"]["port"], servers["Delta"]["peer_port"] = 2, 1  # refuses: never linked
    added = herd_config(servers)
    node = make_node("Beta", old, log=tmp_path / "Beta.log")
    door = peer_port(node, old)
    async with trio.open_nursery() as nursery:
        links = Links(node, old, door, nursery)
        links.start()
        assert links.dialled == {"Gamma"}
        changes = links.apply(added, door.security)
        assert changes == Changes(linked=("Delta",))
        assert links.dialled == {"Delta", "Gamma"}
        changes = links.apply(old, door.security)
        assert changes.unlinked == ("Delta",)
        assert links.dialled == {"Gamma"}
        assert door.dialers == {"Alpha"}
        dropped = herd_config({**servers, "Alpha": {"port": 12000, "peer_port": 12100}})
        assert links.apply(dropped, door.security).unlinked == ()
        assert door.dialers == frozenset()  # Alpha no longer dials Beta: refused from now on
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    node.log.close()
    assert "link to Delta closed by a reload" in (tmp_path / "Beta.log").read_text()


async def test_accepted_link_of_a_removed_neighbour_is_closed(tmp_path: Path) -> None:
    """PeerPort.allow cancels the accepted link of a neighbour no longer allowed."""
    herd = herd_config()
    node = make_node("Beta", herd, log=tmp_path / "Beta.log")
    door = peer_port(node, herd)
    held = trio.Event()

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            door._accepted["Alpha"] = scope
            task_status.started()
            await trio.sleep_forever()
        held.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(run)  # a stand-in for an accepted link
        assert door.allow(frozenset()) == {"Alpha"}
        await held.wait()
    node.log.close()
    assert "link from Alpha closed: no longer a neighbour" in (tmp_path / "Beta.log").read_text()


async def test_reloader_keeps_everything_on_a_bad_config(tmp_path: Path) -> None:
    """A read that fails, or a config without this server, changes nothing and says why
    in the server's log; a good one reopens the log and reports per server."""
    herd = herd_config()
    node = make_node("Beta", herd, log=tmp_path / "Beta.log")
    door = peer_port(node, herd)
    answers: list[HerdConfig | ConfigError] = [
        ConfigError("invalid TOML: boom", file="herd.toml"),
        herd_config({"Alpha": {"port": 12000, "peer_port": 12100}}),
        herd,
    ]

    def read(names: Iterable[str]) -> tuple[HerdConfig, dict[str, PeerSecurity]]:
        answer = answers.pop(0)
        if isinstance(answer, ConfigError):
            raise answer
        return answer, {name: door.security for name in names}

    reloader = Reloader(read, {"Beta": node.log})
    async with trio.open_nursery() as nursery:
        links = Links(node, herd, door, nursery)
        links.start()
        reloader.servers["Beta"] = links
        assert reloader.reload("SIGHUP received") == {
            "ok": False,
            "error": "herd.toml: invalid TOML: boom",
        }
        missing = reloader.reload("SIGHUP received")
        assert missing["error"] == "Beta missing from the new config"
        assert links.dialled == {"Gamma"}
        done = reloader.reload("SIGHUP received")
        assert done["ok"] is True
        assert done["servers"]["Beta"] == Changes().as_json()
        nursery.cancel_scope.cancel()
    node.log.close()
    log = (tmp_path / "Beta.log").read_text()
    assert "reload failed, the running config stays: herd.toml: invalid TOML: boom" in log
    assert "SIGHUP received: log file reopened; reloading the config" in log
    assert "reloaded: no link changes" in log


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # an IPv4 peer on a dual-stack `::` listener
        ("fe80::1%lo", False),
        ("10.77.0.1", False),
        ("fd77::1", False),
        ("::ffff:10.77.0.1", False),
        ("localhost", False),  # a peer address is never a name
    ],
)
def test_unauthenticated_peers_must_be_on_loopback_in_both_families(
    host: str, loopback: bool
) -> None:
    assert is_loopback_host(host) is loopback


async def test_an_ipv6_loopback_peer_is_taken_without_a_secret(tmp_path: Path) -> None:
    """With neither secret nor TLS the peer port takes loopback only, and [::1] is
    loopback: its HELLO is answered, not refused (off-loopback sources: above)."""
    herd = herd_config()
    node = make_node("Beta", herd, log=tmp_path / "Beta.log")
    door = peer_port(node, herd)
    listeners = await trio.open_tcp_listeners(0, host="::1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, door.handle, listeners)
        stream = await trio.open_tcp_stream("::1", port)
        async with stream:
            await stream.send_all(b"HELLO herd_trio/1 Alpha Beta\n")
            assert await stream.receive_some(4096)  # a loopback peer gets an answer
        nursery.cancel_scope.cancel()
    node.log.close()
    assert "refused peer connection from [::1]" not in (tmp_path / "Beta.log").read_text()
