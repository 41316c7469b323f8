"""The admin port: each endpoint over a real loopback socket, the collector, the event hub."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from collections.abc import AsyncIterator, Callable
from functools import partial
from importlib import resources

import attrs
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from herd_trio import config
from herd_trio.admin import AdminApp, admin_token
from herd_trio.admin import serve as serve_admin
from herd_trio.events import EventHub
from herd_trio.metrics import metrics_registry, render_metrics
from herd_trio.net import socket_of
from herd_trio.places.offline import OfflinePlaces
from herd_trio.stats import Stats
from herd_trio.store import Store
from herd_trio.view import ServerView, store_digest
from tests.e2e.herd import poll
from tests.helpers import KIWI, herd_config, record

TOKEN = "s3cret-token"


class FakeLink:
    """A link writer as the stats see it."""

    def __init__(self, sent: int = 0, depth: int = 0) -> None:
        self.records_sent = sent
        self.queued = depth

    def depth(self) -> int:
        return self.queued


def make_view(neighbours: tuple[str, ...] = ("Bona", "Jaquez")) -> ServerView:
    layout: tuple[dict[str, object], ...] = (
        {"name": "Clark", "location": [34.07, -118.45], "admin": None, "neighbours": []},
    )
    return ServerView("Clark", "9.9", Stats(), Store(), neighbours, layout)


async def start(nursery: trio.Nursery, app: AdminApp) -> str:
    port: int = await nursery.start(partial(serve_admin, app, "127.0.0.1", 0))
    return f"http://127.0.0.1:{port}"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
        yield http


class EventReader:
    """GET /events over a plain socket (httpx's nested async generators warn when left open)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream, self.buffer = stream, b""

    @classmethod
    async def open(cls, base: str) -> EventReader:
        port = int(base.rpartition(":")[2])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /events HTTP/1.1\r\nHost: test\r\n\r\n")
        return cls(stream)

    async def head(self) -> bytes:
        """The response head."""
        return await self._until(b"\r\n\r\n")

    async def next_event(self) -> object:
        """The next `data:` line's JSON (chunked framing lines are skipped)."""
        while True:
            line = await self._until(b"\n")
            if line.startswith(b"data: "):
                return json.loads(line[6:])

    async def _until(self, end: bytes) -> bytes:
        with trio.fail_after(5):
            while end not in self.buffer:
                chunk = await self.stream.receive_some()
                if not chunk:
                    raise AssertionError(f"closed; got {self.buffer!r}")
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(end)
        return line


def metrics_of(view: ServerView) -> dict[str, float]:
    text = render_metrics(metrics_registry(view)).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def test_collector_reads_live_counters_at_scrape_time() -> None:
    view = make_view()
    stats = view.stats
    live = FakeLink(sent=3, depth=2)
    counts = stats.link_up("Bona", "in", live)
    counts.kept, counts.stale, counts.duplicate = 5, 1, 2
    counts.rounds_received, counts.sync_records_sent, counts.rtt = 4, 7, 0.0015
    stats.link_dropped("Jaquez", "silent", "no word from Jaquez for 3 s")
    stats.iamat, stats.whatsat, stats.invalid = 10, 4, 1
    stats.requests.observe(0.0002)
    stats.refused("HandshakeError")
    view.store.offer(record("Clark", KIWI))
    samples = metrics_of(view)
    assert samples["herd_link_up{peer=Bona}"] == 1
    assert samples["herd_link_up{peer=Jaquez}"] == 0
    assert samples["herd_link_drops_total{peer=Jaquez,reason=silent}"] == 1
    assert samples["herd_link_rtt_seconds{peer=Bona}"] == 0.0015
    assert "herd_link_rtt_seconds{peer=Jaquez}" not in samples  # never measured
    assert samples["herd_records_sent_total{peer=Bona}"] == 3
    assert samples["herd_records_received_total{peer=Bona,verdict=kept}"] == 5
    assert samples["herd_records_received_total{peer=Bona,verdict=stale}"] == 1
    assert samples["herd_records_received_total{peer=Bona,verdict=duplicate}"] == 2
    assert samples["herd_link_outbox_records{peer=Bona}"] == 2
    assert samples["herd_sync_rounds_total{direction=received,peer=Bona}"] == 4
    assert samples["herd_sync_records_sent_total{peer=Bona}"] == 7
    assert samples["herd_store_records{}"] == 1
    assert samples["herd_commands_total{kind=iamat}"] == 10
    assert samples["herd_request_duration_seconds_bucket{le=0.0005}"] == 1
    assert samples["herd_request_duration_seconds_count{}"] == 1
    assert samples["herd_auth_refusals_total{kind=HandshakeError}"] == 1
    assert samples["herd_build_info{server=Clark,version=9.9}"] == 1
    assert not [name for name in samples if "_created" in name]
    assert all(name.startswith("herd_") for name in samples)
    live.records_sent = 8  # read at scrape time, and kept across a reconnection
    stats.link_down("Bona", live)
    assert metrics_of(view)["herd_records_sent_total{peer=Bona}"] == 8
    assert metrics_of(view)["herd_link_up{peer=Bona}"] == 0


def test_a_replaced_links_end_does_not_mark_the_new_one_down() -> None:
    stats = Stats()
    old, new = FakeLink(sent=2), FakeLink()
    stats.link_up("Bona", "in", old)
    stats.link_up("Bona", "in", new)
    stats.link_down("Bona", old)
    assert stats.peers["Bona"].live is new


async def test_healthz_and_readyz(nursery: trio.Nursery, client: httpx.AsyncClient) -> None:
    view = make_view()
    base = await start(nursery, AdminApp(view, EventHub()))
    assert (await client.get(f"{base}/healthz")).text == "ok\n"
    assert (await client.get(f"{base}/readyz")).status_code == 503
    view.stats.listening = True
    ready = await client.get(f"{base}/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "state_loaded": True,
        "places_ready": True,
        "listeners_up": True,
        "links_up": 0,
        "links_total": 2,
    }
    assert (await client.get(f"{base}/readyz?links=all")).status_code == 503
    view.stats.link_up("Bona", "in", FakeLink())
    view.stats.link_up("Jaquez", "out", FakeLink())
    assert (await client.get(f"{base}/readyz?links=all")).status_code == 200


async def test_readyz_waits_for_the_places_data(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    places = OfflinePlaces(trio.Event())  # loading: no index delivered yet
    view = attrs.evolve(make_view(), places=places)
    view.stats.listening = True
    base = await start(nursery, AdminApp(view, EventHub()))
    loading = await client.get(f"{base}/readyz")
    assert (loading.status_code, loading.json()["places_ready"]) == (503, False)
    places._deliver(None, "index child exited with status 1")
    failed = await client.get(f"{base}/readyz")
    assert failed.status_code == 503
    assert failed.json()["places_error"] == "index child exited with status 1"


async def test_state_lists_links_records_and_digest(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    view = make_view()
    view.stats.link_up("Bona", "in", FakeLink(sent=4, depth=1))
    view.stats.link_dropped("Jaquez", "timeout", "timed out")
    view.store.offer(record("Clark", KIWI))
    base = await start(nursery, AdminApp(view, EventHub()))
    state = (await client.get(f"{base}/state")).json()
    assert (state["name"], state["version"], state["records"]) == ("Clark", "9.9", 1)
    assert state["digest"] == store_digest(view.store)
    bona, jaquez = state["links"]
    assert (bona["peer"], bona["direction"], bona["up"], bona["outbox"]) == ("Bona", "in", True, 1)
    assert bona["records_out"] == 4
    assert bona["up_since"].endswith("Z")
    assert (bona["rtt_ms"], jaquez["rtt_ms"]) == (None, None)  # no PING answered yet
    assert (jaquez["up"], jaquez["last_error"], jaquez["up_since"]) == (False, "timed out", None)
    assert state["herd"][0]["location"] == [34.07, -118.45]
    clients = (await client.get(f"{base}/clients")).json()
    assert clients["clients"][0]["id"] == "kiwi.cs.ucla.edu"
    assert clients["clients"][0]["origin"] == "Clark"


async def test_metrics_endpoint_is_prometheus_text(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    base = await start(nursery, AdminApp(make_view(), EventHub()))
    response = await client.get(f"{base}/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=")
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"herd_link_up", "herd_commands", "herd_request_duration_seconds"} <= names


async def test_events_stream_sends_kept_records_and_link_changes(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    view = make_view()
    base = await start(nursery, AdminApp(view, EventHub()))
    reader = await EventReader.open(base)
    async with reader.stream:
        assert b"content-type: text/event-stream" in (await reader.head()).lower()
        assert await reader.next_event() == {"type": "hello", "server": "Clark"}
        view.store.offer(record("Bona", KIWI))
        view.stats.link_up("Bona", "in", FakeLink())
        assert await reader.next_event() == {
            "type": "client",
            "id": "kiwi.cs.ucla.edu",
            "origin": "Bona",
            "lat": 34.06893,
            "lon": -118.445127,
        }
        assert await reader.next_event() == {"type": "link", "peer": "Bona", "up": True}


def test_a_slow_subscriber_is_dropped_not_waited_for() -> None:
    hub = EventHub(buffer=2)
    with hub.subscribe() as slow:
        for n in range(3):
            hub.publish({"n": n})  # never blocks
        assert hub.subscribers == 0
        assert [slow.receive_nowait(), slow.receive_nowait()] == [{"n": 0}, {"n": 1}]
        with pytest.raises(trio.EndOfChannel):
            slow.receive_nowait()


PROC_FD = os.path.isdir("/proc/self/fd")  # net.shut_connections looks there


def connections_on(port: int) -> int:
    """This process's connected TCP sockets whose local port is `port` (the server ends)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        if (sock := socket_of(name)) is None:
            continue
        with sock:
            try:
                if sock.getsockname()[1] == port and sock.getpeername():
                    count += 1
            except (OSError, IndexError, TypeError):
                continue
    return count


@pytest.mark.skipif(not PROC_FD, reason="needs Linux's /proc")
async def test_an_events_reader_that_stops_reading_is_cut_off(nursery: trio.Nursery) -> None:
    view = make_view()
    hub = EventHub()
    base = await start(nursery, AdminApp(view, hub, send_stall=0.5))
    port = int(base.rpartition(":")[2])
    stalled = trio.socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with stalled:
        await stalled.connect(("127.0.0.1", port))
        await stalled.send(b"GET /events HTTP/1.1\r\nHost: test\r\n\r\n")
        await poll_until(lambda: hub.subscribers == 1)
        # 64 KB events until the server's writes wait on the full socket and the hub
        # drops the reader; bounded: 600 events are 38 MB, far more than any buffer.
        for n in range(600):
            hub.publish({"n": n, "pad": "x" * 65536})
            await trio.sleep(0.001)
            if hub.subscribers == 0:
                break
        assert hub.subscribers == 0
        # The write that waits on the reader is cut off: the server closes its end.
        await poll_until(lambda: connections_on(port) == 0)


async def poll_until(check: Callable[[], bool], deadline: float = 10.0) -> None:
    async def holds() -> bool | None:
        await trio.lowlevel.checkpoint()
        return True if check() else None

    await poll("the condition holds", holds, deadline=deadline)


async def test_a_token_guards_everything_but_healthz(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    base = await start(nursery, AdminApp(make_view(), EventHub(), TOKEN))
    assert (await client.get(f"{base}/healthz")).status_code == 200
    refused = await client.get(f"{base}/state")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    wrong = {"Authorization": "Bearer nope"}
    assert (await client.get(f"{base}/metrics", headers=wrong)).status_code == 401
    right = {"Authorization": f"Bearer {TOKEN}"}
    assert (await client.get(f"{base}/state", headers=right)).status_code == 200


async def test_only_gets_without_bodies_and_only_packaged_files(
    nursery: trio.Nursery, client: httpx.AsyncClient
) -> None:
    base = await start(nursery, AdminApp(make_view(), EventHub()))
    assert (await client.post(f"{base}/state")).status_code == 405
    assert (await client.request("GET", f"{base}/state", content=b"x" * 10)).status_code == 413
    assert (await client.get(f"{base}/nothing")).status_code == 404
    assert (await client.get(f"{base}/static/..%2Fadmin.py")).status_code == 404
    page = await client.get(f"{base}/")
    assert page.status_code == 200
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert (await client.get(f"{base}/static/vendor/d3-geo.min.js")).status_code == 200
    huge = {"X-Filler": "a" * 10_000}
    assert (await client.get(f"{base}/healthz", headers=huge)).status_code in (400, 431)


async def test_cancelling_stops_the_listener_with_a_stream_open(client: httpx.AsyncClient) -> None:
    view = make_view()
    async with trio.open_nursery() as nursery:
        base = await start(nursery, AdminApp(view, EventHub()))
        reader = await EventReader.open(base)
        async with reader.stream:
            assert await reader.next_event() == {"type": "hello", "server": "Clark"}
            nursery.cancel_scope.cancel()
    with pytest.raises(httpx.ConnectError):
        await client.get(f"{base}/healthz")


def test_the_default_herd_has_admin_ports_and_five_places() -> None:
    herd = config.load()
    assert [s.admin_port for s in herd.servers.values()] == [12200, 12201, 12202, 12203, 12204]
    assert sorted(s.port for s in herd.servers.values()) == [s.port for s in herd.servers.values()]
    places = {config.location_degrees(s.location or "") for s in herd.servers.values()}
    assert None not in places
    assert len(places) == 5


@pytest.mark.parametrize(
    ("server", "problem"),
    [
        ({"admin_host": "0.0.0.0", "admin_port": 9}, "servers.A.admin_token_env: an admin"),
        ({"location": "34.07,-118.44"}, "servers.A.location: expected ISO 6709"),
        ({"location": "+95.0-118.44"}, "servers.A.location: expected ISO 6709"),
        ({"admin_port": 2}, "servers.A.admin_port: 2 is already used by servers.A.peer_port"),
    ],
)
def test_admin_settings_are_checked(server: dict[str, object], problem: str) -> None:
    herd = herd_config({"A": {"port": 1, "peer_port": 2, **server}})
    with pytest.raises(config.ConfigError, match=re.escape(problem)):
        config.check(herd)


def test_an_unset_admin_token_variable_is_a_config_error() -> None:
    herd = herd_config(
        {"A": {"port": 1, "peer_port": 2, "admin_port": 3, "admin_token_env": "HERD_ADMIN"}}
    )
    with pytest.raises(config.ConfigError, match=r"\$HERD_ADMIN is not set"):
        admin_token(herd, "A", {})
    assert admin_token(herd, "A", {"HERD_ADMIN": TOKEN}) == TOKEN


def test_vendored_files_match_their_recorded_checksums() -> None:
    vendor = resources.files("herd_trio").joinpath("web", "static", "vendor")
    sums = vendor.joinpath("SHA256SUMS").read_text().splitlines()
    assert len(sums) >= 9
    for line in sums:
        digest, name = line.split(maxsplit=1)
        assert hashlib.sha256(vendor.joinpath(name).read_bytes()).hexdigest() == digest, name
