"""Config: the embedded default herd, validation, and one clear ConfigError (PROTOCOL.md §5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from herd_trio.config import DEFAULT_LABEL, ConfigError, HerdConfig, host_problem, load

TWO = """
[servers.Alpha]
port = 12000
peer_port = 12100
neighbours = ["Beta"]

[servers.Beta]
port = 12001
peer_port = 12101
"""


def write(tmp_path: Path, text: str, name: str = "herd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> HerdConfig:
    return load(write(tmp_path, text), environ={} if environ is None else environ)


def refused(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, environ)
    message = str(info.value)
    assert "\n" not in message  # one clear line for stderr
    return message


# --- the embedded default -----------------------------------------------------------------


def test_default_herd_has_five_servers_on_their_ports() -> None:
    herd = load(None, environ={})
    assert list(herd.servers) == ["Bailey", "Bona", "Campbell", "Clark", "Jaquez"]
    assert [(s.host, s.port, s.peer_port) for s in herd.servers.values()] == [
        ("127.0.0.1", 12000 + n, 12100 + n) for n in range(5)
    ]


def test_default_herd_neighbours_are_symmetric() -> None:
    herd = load(None, environ={})
    edges = {frozenset((name, other)) for name in herd.servers for other in herd.neighbours(name)}
    expected = [
        ("Clark", "Jaquez"),
        ("Clark", "Bona"),
        ("Campbell", "Bailey"),
        ("Campbell", "Bona"),
        ("Campbell", "Jaquez"),
        ("Bona", "Bailey"),
    ]
    assert edges == {frozenset(edge) for edge in expected}
    for name in herd.servers:
        for other in herd.neighbours(name):
            assert name in herd.neighbours(other)
    assert herd.neighbours("Clark") == ["Bona", "Jaquez"]
    assert herd.neighbours("Bailey") == ["Bona", "Campbell"]


def test_default_herd_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load(None, environ={}).herd
    assert settings.log_dir == str(tmp_path / "logs")  # the working directory's
    assert (settings.one_shot, settings.max_line) == (False, 4096)
    assert (settings.places, settings.places_timeout) == ("offline", 5.0)
    assert settings.secret_env is None


def test_neighbours_listed_on_one_side_only_are_symmetric(tmp_path: Path) -> None:
    herd = load_text(tmp_path, TWO)
    assert herd.neighbours("Alpha") == ["Beta"]
    assert herd.neighbours("Beta") == ["Alpha"]


# --- paths --------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(folder, '[herd]\nlog_dir = "logs/here"\nstate_dir = "st"\n' + TWO)
    herd = load(Path("..") / "conf" / "herd.toml", environ={})
    assert Path(herd.herd.log_dir) == folder / "logs" / "here"
    assert herd.herd.state_dir is not None
    assert Path(herd.herd.state_dir) == folder / "st"
    assert load(path, environ={}).herd.log_dir == str(folder / "logs" / "here")


def test_default_log_dir_of_a_file_is_beside_the_file(tmp_path: Path) -> None:
    herd = load_text(tmp_path, TWO)
    assert herd.herd.log_dir == str(tmp_path / "logs")
    assert herd.herd.state_dir is None


def test_absolute_log_dir_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "abs" / "logs"
    herd = load_text(tmp_path, f"[herd]\nlog_dir = {str(target)!r}\n" + TWO)
    assert herd.herd.log_dir == str(target)


def test_settings_are_read(tmp_path: Path) -> None:
    herd = load_text(
        tmp_path,
        "[herd]\none_shot = true\nmax_line = 100\nplaces_timeout = 2\n"
        'places_url = "http://127.0.0.1:8080/prefix"\n'
        + TWO.replace("[servers.Beta]", '[servers.Beta]\nhost = "127.0.0.2"'),
    )
    assert (herd.herd.one_shot, herd.herd.max_line, herd.herd.places_timeout) == (True, 100, 2.0)
    assert herd.herd.places_url == "http://127.0.0.1:8080/prefix"
    assert herd.servers["Beta"].host == "127.0.0.2"
    assert herd.servers["Alpha"].host == "127.0.0.1"


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("colour = 'red'\n" + TWO, "colour"),
        ("[herd]\ncolour = 'red'\n" + TWO, "colour"),
        ("[herd]\nmaxline = 4096\n" + TWO, "maxline"),
        (TWO + "weight = 3\n", "weight"),
        (TWO.replace("port = 12000", "port = 12000\nneighbors = []"), "neighbors"),
        ("[server.Alpha]\nport = 1\npeer_port = 2\n" + TWO, "server"),
    ],
)
def test_unknown_keys_are_refused(tmp_path: Path, text: str, key: str) -> None:
    assert key in refused(tmp_path, text)


def test_unknown_neighbour_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, TWO.replace('["Beta"]', '["Beta", "Gamma"]'))
    assert "Gamma" in message


def test_a_server_cannot_neighbour_itself(tmp_path: Path) -> None:
    refused(tmp_path, TWO.replace('["Beta"]', '["Alpha"]'))


@pytest.mark.parametrize(
    "text",
    [
        TWO.replace("port = 12001", "port = 12000"),  # client ports clash
        TWO.replace("peer_port = 12101", "peer_port = 12100"),  # peer ports clash
        TWO.replace("peer_port = 12101", "peer_port = 12000"),  # Beta's peer, Alpha's client
        TWO.replace("peer_port = 12100", "peer_port = 12000"),  # one server, both ports
        # a wildcard host binds every address, so it clashes with any host, either order
        TWO.replace("[servers.Beta]", '[servers.Beta]\nhost = "0.0.0.0"').replace(
            "port = 12001", "port = 12000"
        ),
        TWO.replace("[servers.Alpha]", '[servers.Alpha]\nhost = "::"').replace(
            "port = 12001", "port = 12000"
        ),
    ],
)
def test_duplicate_ports_are_refused(tmp_path: Path, text: str) -> None:
    assert "already used" in refused(tmp_path, text)


def test_the_same_port_on_different_hosts_is_allowed(tmp_path: Path) -> None:
    text = TWO.replace("port = 12001", "port = 12000").replace(
        "[servers.Beta]", '[servers.Beta]\nhost = "127.0.0.2"'
    )
    herd = load_text(tmp_path, text)
    assert [s.port for s in herd.servers.values()] == [12000, 12000]


@pytest.mark.parametrize(
    "text",
    [
        "[servers.Alpha\nport = 1\n",
        "[servers.Alpha]\nport = \n",
        TWO + "[servers.Alpha]\nport = 3\npeer_port = 4\n",  # a table defined twice
        "\x00",
    ],
)
def test_bad_toml_is_refused(tmp_path: Path, text: str) -> None:
    assert "invalid TOML" in refused(tmp_path, text)


@pytest.mark.parametrize(
    "text",
    [
        TWO.replace("port = 12000", 'port = "12000"'),
        TWO.replace("port = 12000", "port = true"),
        TWO.replace("port = 12000", "port = 12000.0"),
        TWO.replace('["Beta"]', '"Beta"'),
        TWO.replace('["Beta"]', "[1]"),
        "[herd]\none_shot = 'yes'\n" + TWO,
        "[herd]\nmax_line = 1.5\n" + TWO,
        "[herd]\nplaces = 'bing'\n" + TWO,
        "[herd]\nplaces_timeout = 'soon'\n" + TWO,
        "servers = 3\n",
        "[herd]\n",  # no servers at all
        TWO.replace("peer_port = 12100\n", ""),  # a required key missing
    ],
)
def test_wrong_types_and_missing_keys_are_refused(tmp_path: Path, text: str) -> None:
    refused(tmp_path, text)


@pytest.mark.parametrize(
    "text",
    [
        TWO.replace("port = 12000", "port = 0"),
        TWO.replace("port = 12000", "port = 65536"),
        "[herd]\nmax_line = 10\n" + TWO,
        "[herd]\nplaces_timeout = 0\n" + TWO,
        "[herd]\nplaces_url = 'ftp://example.com'\n" + TWO,
        "[servers.'bad name']\nport = 1\npeer_port = 2\n",
        "[servers.''\n]\nport = 1\npeer_port = 2\n",
    ],
)
def test_out_of_range_values_are_refused(tmp_path: Path, text: str) -> None:
    refused(tmp_path, text)


def test_empty_servers_table_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, "[servers]\n")


@pytest.mark.parametrize("source", ["google", "google-legacy"])
def test_google_sources_need_their_key_variable(tmp_path: Path, source: str) -> None:
    text = f"[herd]\nplaces = '{source}'\n" + TWO
    assert "GOOGLE_PLACES_API_KEY" in refused(tmp_path, text, environ={})
    assert load_text(tmp_path, text, {"GOOGLE_PLACES_API_KEY": "k"}).herd.places == source
    custom = f"[herd]\nplaces = '{source}'\nplaces_key_env = 'MY_KEY'\n" + TWO
    assert "MY_KEY" in refused(tmp_path, custom, environ={"GOOGLE_PLACES_API_KEY": "k"})
    assert load_text(tmp_path, custom, {"MY_KEY": "k"}).herd.places_key_env == "MY_KEY"


def test_offline_source_needs_no_key(tmp_path: Path) -> None:
    assert load_text(tmp_path, "[herd]\nplaces = 'offline'\n" + TWO).herd.places == "offline"


def test_a_missing_or_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    assert str(info.value) == f"{path}: cannot read: No such file or directory"
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\n" + TWO.encode())
    with pytest.raises(ConfigError, match=r"latin1\.toml: cannot read: not UTF-8"):
        load(tmp_path / "latin1.toml", environ={})


# --- one format: FILE: FIELD.PATH: what is wrong --------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # unknown keys, at every level
        ("colour = 'red'\n" + TWO, "colour: unknown key"),
        ("[herd]\ncolour = 'red'\n" + TWO, "herd.colour: unknown key"),
        (TWO + "weight = 3\n", "servers.Beta.weight: unknown key"),
        # wrong types, named by their field (never msgspec's `$.servers[...]`)
        (TWO.replace("port = 12000", 'port = "1"'), "servers.Alpha.port: expected int, got str"),
        (TWO.replace('["Beta"]', "[1]"), "servers.Alpha.neighbours[0]: expected str, got int"),
        ("[herd]\none_shot = 'yes'\n" + TWO, "herd.one_shot: expected bool, got str"),
        ("servers = 3\n", "servers: expected object, got int"),
        # missing keys
        (TWO.replace("peer_port = 12100\n", ""), "servers.Alpha.peer_port: required key missing"),
        ("[herd]\n", "servers: required key missing"),
        # out of range, declared on the field
        (TWO.replace("port = 12000", "port = 0"), "servers.Alpha.port: expected int >= 1"),
        (TWO.replace("port = 12001", "port = 65536"), "servers.Beta.port: expected int <= 65535"),
        ("[herd]\nmax_line = 10\n" + TWO, "herd.max_line: expected int >= 64"),
        ("[herd]\nplaces_timeout = 0\n" + TWO, "herd.places_timeout: expected float > 0.0"),
        ("[herd]\nmax_clients = 0\n" + TWO, "herd.max_clients: expected int >= 1"),
        ("[herd]\nsync_interval = 1e9\n" + TWO, "herd.sync_interval: expected float <= 86400.0"),
        # cross-checks
        (
            TWO.replace('["Beta"]', '["Beta", "Jaquez"]'),
            "servers.Alpha.neighbours: unknown server 'Jaquez'",
        ),
        (
            TWO.replace("port = 12001", "port = 12000"),
            "servers.Beta.port: 12000 is already used by servers.Alpha.port",
        ),
        (
            TWO.replace("[servers.Beta]", '[servers.Beta]\nhost = "127.0.0.300"'),
            "servers.Beta.host: '127.0.0.300' is neither an IP address nor a valid host name",
        ),
        (
            "[herd]\nsecret_env = 'A'\nkeyring_file = 'k'\n" + TWO,
            "herd: set secret_env or keyring_file, not both",
        ),
        ("[servers]\n", "servers: no servers configured"),
    ],
)
def test_every_error_reads_file_field_problem(tmp_path: Path, text: str, expected: str) -> None:
    assert refused(tmp_path, text) == f"{tmp_path / 'herd.toml'}: {expected}"


def test_errors_name_the_file_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, TWO.replace('["Beta"]', '["Jaquez"]'))
    with pytest.raises(ConfigError) as info:
        load(Path("herd.toml"), environ={})
    assert str(info.value) == "herd.toml: servers.Alpha.neighbours: unknown server 'Jaquez'"
    assert (info.value.file, info.value.field) == ("herd.toml", "servers.Alpha.neighbours")
    assert info.value.problem == "unknown server 'Jaquez'"


def test_no_message_has_msgspec_paths_or_backticks(tmp_path: Path) -> None:
    for text in (TWO + "weight = 3\n", TWO.replace("port = 12000", "port = true"), "[herd]\n"):
        message = refused(tmp_path, text)
        assert "$" not in message
        assert "`" not in message


def test_the_embedded_default_has_a_label() -> None:
    assert DEFAULT_LABEL == "<default config>"
    error = ConfigError("x", field="herd.y").in_file(DEFAULT_LABEL)
    assert str(error) == "<default config>: herd.y: x"


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "::1", "0.0.0.0", "::", "", "localhost", "herd-1.example.com", "example.com."],
)
def test_addresses_and_host_names_are_accepted(host: str) -> None:
    assert host_problem(host) is None


@pytest.mark.parametrize(
    "host",
    ["127.0.0.300", "1.2.3", "-bad.example", "bad-.x", "a..b", "sp ace", "caf\u00e9", "x" * 64],
)
def test_bad_hosts_are_refused_without_a_lookup(host: str) -> None:
    assert host_problem(host) == f"{host!r} is neither an IP address nor a valid host name"
