"""The command line in-process: overrides, where state goes, the start-up locations."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from herd_trio import config
from herd_trio.__main__ import (
    GC_YOUNG,
    apply_overrides,
    collect_less,
    locations,
    main,
    parse_args,
    unprotected,
)
from herd_trio.security import PeerSecurity


def overridden(argv: list[str]) -> config.HerdConfig:
    args = parse_args(argv)
    return apply_overrides(config.load(args.config, environ={}), args)


TWO = "[servers.A]\nport = 1\npeer_port = 2\n[servers.B]\nport = 3\npeer_port = 4\n"


def test_all_keeps_state_in_the_config_files_folder_whatever_the_log_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "herd.toml").write_text('[herd]\nlog_dir = "/var/tmp/elsewhere"\n' + TWO)
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--log-dir", "a"], ["--log-dir", "/b"]):
        herd = overridden(["--all", "--config", "conf/herd.toml", *extra])
        assert herd.herd.state_dir == str(folder / "state")
    assert overridden(["--all", "--config", "conf/herd.toml", "--log-dir", "a"]).herd.log_dir == (
        str(tmp_path / "a")
    )


def test_all_with_the_embedded_config_keeps_state_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert overridden(["--all", "--log-dir", "/tmp/x"]).herd.state_dir == str(tmp_path / "state")


def test_state_dir_on_the_command_line_wins_and_one_server_keeps_none_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert overridden(["--all", "--state-dir", "st"]).herd.state_dir == str(tmp_path / "st")
    assert overridden(["Clark", "--state-dir", "st"]).herd.state_dir == str(tmp_path / "st")
    assert overridden(["Clark"]).herd.state_dir is None


def test_locations_name_the_log_and_state_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert locations(overridden(["--all"])) == [
        f"logs: {tmp_path / 'logs'}",
        f"state: {tmp_path / 'state'}",
    ]
    assert locations(overridden(["Clark"]))[1].startswith("state: none ")


def test_a_config_error_is_one_line_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.toml").write_text(TWO.replace("port = 3", "port = 1"))
    assert main(["A", "--config", "bad.toml"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "bad.toml: servers.B.port: 1 is already used by servers.A.port\n"
    assert captured.out == ""


def test_a_security_error_is_a_config_error_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HERD_TEST_UNSET", raising=False)
    (tmp_path / "bad.toml").write_text("[herd]\nsecret_env = 'HERD_TEST_UNSET'\n" + TWO)
    assert main(["A", "--config", "bad.toml"]) == 2
    assert capsys.readouterr().err == "bad.toml: herd.secret_env: $HERD_TEST_UNSET is not set\n"


def test_an_unprotected_server_beyond_loopback_gets_a_warning() -> None:
    assert unprotected("A", "127.0.0.1", PeerSecurity()) is None
    assert unprotected("A", "0.0.0.0", PeerSecurity()) is not None
    assert "A listens on example.com without" in (
        unprotected("A", "example.com", PeerSecurity()) or ""
    )


def test_collect_less_spaces_young_collections_and_keeps_the_older_ones() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 7, 9)
        collect_less()
        assert gc.get_threshold() == (GC_YOUNG, 7, 9)
        assert gc.isenabled()
    finally:
        gc.set_threshold(*before)
