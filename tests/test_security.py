"""load_security: the keyring and TLS contexts, read once at start-up, errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from herd_trio.config import ConfigError, HerdConfig, load
from herd_trio.security import PeerSecurity, load_keyring, load_security, load_tls

SECRET = "a long enough s3cret"
TWO = """
[servers.Alpha]
port = 12000
peer_port = 12100
neighbours = ["Beta"]

[servers.Beta]
port = 12001
peer_port = 12101
"""


def herd_of(tmp_path: Path, herd_table: str, servers: str = TWO) -> HerdConfig:
    path = tmp_path / "herd.toml"
    path.write_text("[herd]\n" + herd_table + servers, encoding="utf-8")
    return load(path, environ={})


def refused(herd: HerdConfig, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_security(herd, list(herd.servers), {} if environ is None else environ)
    assert info.value.file is None  # the caller knows the file: ConfigError.in_file
    message = str(info.value.in_file("herd.toml"))
    assert "\n" not in message
    return message


def test_no_secret_and_no_certificate_is_no_protection(tmp_path: Path) -> None:
    herd = herd_of(tmp_path, "")
    assert load_security(herd, ["Alpha", "Beta"], {"HERD_SECRET": SECRET}) == {
        "Alpha": PeerSecurity(None, None),
        "Beta": PeerSecurity(None, None),
    }


def test_the_keyring_is_read_once_and_shared(tmp_path: Path) -> None:
    herd = herd_of(tmp_path, "secret_env = 'HERD_SECRET'\n")
    security = load_security(herd, ["Alpha", "Beta"], {"HERD_SECRET": f"  {SECRET}\n"})
    alpha, beta = security["Alpha"].keyring, security["Beta"].keyring
    assert alpha is not None
    assert alpha is beta
    assert alpha.keys == (SECRET.encode(),)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "herd.toml: herd.secret_env: $HERD_SECRET is not set"),
        ({"HERD_SECRET": ""}, "herd.toml: herd.secret_env: $HERD_SECRET is not set"),
        (
            {"HERD_SECRET": "s3cret"},
            "herd.toml: herd.secret_env: $HERD_SECRET: secret shorter than 16 bytes",
        ),
    ],
)
def test_an_unusable_secret_env_is_a_config_error(
    tmp_path: Path, environ: dict[str, str], expected: str
) -> None:
    assert refused(herd_of(tmp_path, "secret_env = 'HERD_SECRET'\n"), environ) == expected


def test_a_missing_key_file_is_a_config_error(tmp_path: Path) -> None:
    herd = herd_of(tmp_path, "keyring_file = 'keys'\n")
    path = tmp_path / "keys"
    assert refused(herd) == (
        f"herd.toml: herd.keyring_file: cannot read {str(path)!r}: No such file or directory"
    )
    path.write_bytes(b"# first\n" + SECRET.encode() + b"\nshort-secret\n")
    message = refused(herd)
    assert message == (
        f"herd.toml: herd.keyring_file: {str(path)!r} line 3: secret shorter than 16 bytes"
    )
    assert "short-secret" not in message


def test_a_key_file_is_read_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "keys").write_bytes(SECRET.encode() + b"\n")
    keyring = load_keyring(herd_of(tmp_path, "keyring_file = 'keys'\n").herd, {})
    assert keyring is not None
    assert keyring.keys[0] == SECRET.encode()


def test_load_security_reads_the_process_environment_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    herd = herd_of(tmp_path, "secret_env = 'HERD_TEST_SECRET'\n")
    monkeypatch.delenv("HERD_TEST_SECRET", raising=False)
    with pytest.raises(ConfigError, match="HERD_TEST_SECRET is not set"):
        load_security(herd, ["Alpha"])
    monkeypatch.setenv("HERD_TEST_SECRET", SECRET)
    keyring = load_security(herd, ["Alpha"])["Alpha"].keyring
    assert keyring is not None
    assert keyring.keys[0] == SECRET.encode()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem, and alpha.pem/alpha.key, beta.pem/beta.key naming each server."""
    folder = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    for name in ("Alpha", "Beta"):
        leaf = ca.issue_cert(name)
        leaf.cert_chain_pems[0].write_to_path(str(folder / f"{name.lower()}.pem"))
        leaf.private_key_pem.write_to_path(str(folder / f"{name.lower()}.key"))
    return folder


def with_own_certs(certs: Path) -> str:
    return TWO.replace(
        "[servers.Beta]",
        f"[servers.Beta]\ntls_cert = '{certs}/beta.pem'\ntls_key = '{certs}/beta.key'",
    ).replace(
        "[servers.Alpha]",
        f"[servers.Alpha]\ntls_cert = '{certs}/alpha.pem'\ntls_key = '{certs}/alpha.key'",
    )


def test_each_server_gets_its_own_tls_contexts(tmp_path: Path, certs: Path) -> None:
    herd = herd_of(tmp_path, f"tls_ca = '{certs}/ca.pem'\n", with_own_certs(certs))
    security = load_security(herd, ["Alpha", "Beta"], {})
    alpha, beta = security["Alpha"].tls, security["Beta"].tls
    assert alpha is not None
    assert beta is not None
    assert alpha.dialling is not beta.dialling
    assert alpha.dialling.check_hostname is True
    assert alpha.accepting.check_hostname is False
    assert load_tls(herd_of(tmp_path, ""), "Alpha") is None


def test_a_bad_certificate_names_the_field_and_file(tmp_path: Path, certs: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    bad_own = with_own_certs(certs).replace(f"{certs}/beta.pem", f"{tmp_path}/bad.pem")
    herd = herd_of(tmp_path, f"tls_ca = '{certs}/ca.pem'\n", bad_own)
    message = refused(herd)
    assert message.startswith(
        f"herd.toml: servers.Beta.tls_cert: cannot load '{tmp_path}/bad.pem' with tls_key"
    )
    shared = (
        f"tls_cert = '{tmp_path}/bad.pem'\ntls_key = '{certs}/alpha.key'\n"
        f"tls_ca = '{certs}/ca.pem'\n"
    )
    assert refused(herd_of(tmp_path, shared)).startswith("herd.toml: herd.tls_cert: cannot load ")
    missing_ca = f"tls_ca = '{tmp_path}/nope.pem'\n"
    assert refused(herd_of(tmp_path, missing_ca, with_own_certs(certs))).startswith(
        f"herd.toml: herd.tls_ca: cannot load '{tmp_path}/nope.pem': "
    )
