"""Config: the embedded default herd, validation, and one clear ConfigError (PROTOCOL.md §5)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from herd_trio.config import ConfigError, HerdConfig, load

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


def test_secret_env_must_name_a_set_variable(tmp_path: Path) -> None:
    text = "[herd]\nsecret_env = 'HERD_TEST_SECRET'\n" + TWO
    assert "HERD_TEST_SECRET" in refused(tmp_path, text, environ={})
    assert "HERD_TEST_SECRET" in refused(tmp_path, text, environ={"HERD_TEST_SECRET": ""})
    assert "shorter" in refused(tmp_path, text, environ={"HERD_TEST_SECRET": "s3cret"})
    herd = load_text(tmp_path, text, environ={"HERD_TEST_SECRET": "a long enough s3cret"})
    assert herd.herd.secret_env == "HERD_TEST_SECRET"


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


def test_load_reads_the_process_environment_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "[herd]\nsecret_env = 'HERD_TEST_SECRET'\n" + TWO)
    monkeypatch.delenv("HERD_TEST_SECRET", raising=False)
    with pytest.raises(ConfigError):
        load(path)
    monkeypatch.setenv("HERD_TEST_SECRET", "a long enough s3cret")
    keyring = load(path).keyring()
    assert keyring is not None
    assert keyring.primary == b"a long enough s3cret"
    assert os.environ["HERD_TEST_SECRET"] == "a long enough s3cret"


def test_a_missing_or_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load(tmp_path / "nope.toml", environ={})
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\n" + TWO.encode())
    with pytest.raises(ConfigError):
        load(tmp_path / "latin1.toml", environ={})
