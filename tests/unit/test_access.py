"""The access policy (pacs/core/access.py): its tables, secrets and answers."""

from __future__ import annotations

import base64
import hashlib
import threading
import tomllib
from pathlib import Path

import pytest

from pacs.core import access, config
from pacs.core.access import AccessPolicy
from pacs.core.errors import ConfigError
from pacs.core.services import access_policy

TABLE = """
[[ae]]
title = "CT1"
host = "10.1.0.0/16"
rights = ["echo", "store"]

[[ae]]
title = "WS1"
host = "127.0.0.1"
port = 11112
rights = ["find", "retrieve"]

[[ae]]
title = "MUTE"
rights = []

[[user]]
name = "alice"
password = "{alice}"
roles = ["read"]

[[user]]
name = "robot"
tokens = ["{robot}"]
roles = ["read", "write"]
"""


@pytest.fixture(scope="module")
def policy() -> AccessPolicy:
    text = TABLE.format(alice=access.hash_password("wonderland"),
                        robot=access.hash_token("tok-robot"))
    return access.build(tables=access.parse(tomllib.loads(text)), unknown_ae_rights=frozenset())


def test_known_aes_have_their_rights_and_unknown_ones_the_default(policy: AccessPolicy
                                                                   ) -> None:
    assert policy.rights_of("CT1") == {"echo", "store"}
    assert policy.may("WS1", "retrieve") and not policy.may("WS1", "store")
    assert policy.rights_of("NOBODY") == frozenset()
    opened = access.build(tables=access.parse(tomllib.loads('[[ae]]\ntitle = "X"\n')))
    assert opened.rights_of("NOBODY") == access.AE_RIGHTS  # the embedded default: open


def test_associations_are_refused_without_rights_or_from_another_address(
        policy: AccessPolicy) -> None:
    assert policy.association_refusal("CT1", "10.1.2.3") is None
    assert policy.association_refusal("CT1", "::ffff:10.1.9.9") is None  # IPv4-mapped
    assert "address" in (policy.association_refusal("CT1", "10.2.0.1") or "")
    assert "no rights" in (policy.association_refusal("MUTE", "10.1.2.3") or "")
    assert "not known" in (policy.association_refusal("NOBODY", "10.1.2.3") or "")
    assert policy.association_refusal("WS1", "127.0.0.1") is None


def test_an_ae_known_over_tls_is_refused_without_it_and_reached_with_it() -> None:
    policy = access.build(tables=access.parse(tomllib.loads(
        '[[ae]]\ntitle = "CT1"\nhost = "10.1.2.3"\nport = 104\nrights = ["store"]\n'
        'tls = true\n')))
    assert "TLS" in (policy.association_refusal("CT1", "10.1.2.3") or "")
    assert policy.association_refusal("CT1", "10.1.2.3", secure=True) is None
    assert policy.destinations()["CT1"].tls


def test_an_ae_pinned_to_certificates_needs_one_of_them_over_tls() -> None:
    mine, other = "ab" * 32, "cd" * 32
    policy = access.build(tables=access.parse(tomllib.loads(
        f'[[ae]]\ntitle = "CT1"\nrights = ["store"]\ncertificates = ["{mine.upper()}"]\n')))
    assert "TLS" in (policy.association_refusal("CT1", "10.1.2.3", certificate=mine) or "")
    assert "certificates" in (policy.association_refusal(
        "CT1", "10.1.2.3", secure=True, certificate=other) or "")
    assert "certificates" in (policy.association_refusal("CT1", "10.1.2.3", secure=True)
                              or "")
    assert policy.association_refusal("CT1", "10.1.2.3", secure=True, certificate=mine) is None
    for wrong in ('"ab"', '"' + "zz" * 32 + '"', "1"):
        with pytest.raises((ValueError, ConfigError)):
            access.parse(tomllib.loads(
                f'[[ae]]\ntitle = "CT1"\nrights = ["store"]\ncertificates = [{wrong}]\n'))


def test_a_host_name_is_resolved_when_it_associates() -> None:
    assert access.address_matches("localhost", "127.0.0.1")
    assert not access.address_matches("localhost", "192.0.2.1")
    assert not access.address_matches("no-such-host.invalid", "127.0.0.1")


def test_only_aes_with_an_address_and_a_port_are_destinations(policy: AccessPolicy) -> None:
    assert list(policy.destinations()) == ["WS1"]


def test_passwords_and_tokens(policy: AccessPolicy) -> None:
    user = policy.by_password("alice", "wonderland")
    assert user is not None and user.roles == {"read"}
    assert policy.by_password("alice", "wonderland") is user  # the verified cache
    assert policy.by_password("alice", "Wonderland") is None
    assert policy.by_password("nobody", "wonderland") is None
    assert policy.by_password("robot", "tok-robot") is None  # a token is no password
    robot = policy.by_token("tok-robot")
    assert robot is not None and robot.name == "robot"
    assert policy.by_token("tok-other") is None
    assert policy.has_passwords and policy.has_tokens


def test_a_password_hash_describes_itself_and_is_salted() -> None:
    first, second = access.hash_password("same"), access.hash_password("same")
    assert first != second and first.startswith("scrypt$16384$8$1$")
    assert access.verify_password("same", first) and access.verify_password("same", second)
    assert not access.verify_password("same", "scrypt$garbage")
    assert access.hash_token("t").startswith("sha256$") and len(access.hash_token("t")) == 71


@pytest.mark.parametrize(("text", "message"), [
    ('[[ae]]\ntitle = "A"\nrights = ["fly"]\n', "unknown right fly"),
    ('[[ae]]\ntitle = "SEVENTEEN-LETTERS"\n', "longer than 16"),
    ('[[ae]]\ntitle = "A"\nport = 104\n', "a port needs a host"),
    ('[[ae]]\ntitle = "A"\n[[ae]]\ntitle = "A"\n', "listed twice"),
    ('[[user]]\nname = "u"\nroles = ["read"]\n', "give a password hash"),
    ('[[user]]\nname = "u"\npassword = "plain"\n', "not a password hash"),
    ('[[user]]\nname = "u"\ntokens = ["plain"]\n', "tokens must be hashes"),
    ('[[user]]\nname = "a:b"\ntokens = []\n', "may not hold ':'"),
    ('[[user]]\nname = "u"\nroles = ["root"]\ntokens = ["sha256$' + "0" * 64 + '"]\n',
     "unknown role root"),
    ('colour = "blue"\n', "unknown key"),
    ('[[ae]]\ntitle = "A"\ntsl = true\n', "AE A: unknown key.s. tsl"),
    ('[[user]]\nname = "robot"\nrole = ["read"]\n', "user robot: unknown key.s. role"),
    ('[[ae]]\ntitle = "A"\ntls = "yes"\n', "tls must be true or false"),
])
def test_a_table_it_cannot_read_is_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        access.parse(tomllib.loads(text))


def test_the_file_is_read_by_the_settings(tmp_path: Path) -> None:
    path = tmp_path / "access.toml"
    path.write_text('unknown_ae_rights = ["echo"]\nloopback_roles = []\n'
                    '[[ae]]\ntitle = "CT1"\nrights = ["store"]\n')
    settings = config.load(overrides={"PACS_ACCESS_FILE": str(path)}, environ={},
                           env_file=None)
    policy = access_policy(settings)
    assert policy.rights_of("CT1") == {"store"}
    assert policy.rights_of("OTHER") == {"echo"}  # the file's default wins
    assert policy.loopback_roles == frozenset()
    missing = config.load(overrides={"PACS_ACCESS_FILE": str(tmp_path / "none.toml")},
                          environ={}, env_file=None)
    with pytest.raises(ConfigError, match="PACS_ACCESS_FILE"):
        access_policy(missing)


def test_the_single_entry_settings_become_entries() -> None:
    settings = config.load(overrides={
        "PACS_ALLOWED_CALLING_AETS": "CT1,MR2", "PACS_WEB_USER": "bob",
        "PACS_WEB_PASSWORD": "pw", "PACS_WEB_TOKEN": "tok",
        "PACS_UNKNOWN_AE_RIGHTS": "echo,find"}, environ={}, env_file=None)
    policy = access_policy(settings)
    assert policy.rights_of("CT1") == access.AE_RIGHTS
    assert policy.rights_of("OTHER") == frozenset()  # the allowed list closes the rest
    bob = policy.by_password("bob", "pw")
    assert bob is not None and bob.roles == access.ROLES
    token = policy.by_token("tok")
    assert token is not None and token.name == access.TOKEN_USER


def test_the_settings_password_is_hashed_on_first_use_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No scrypt at start-up (every process builds a policy, some several); one on the
    first login, whatever the threads asking at once."""
    made: list[str] = []
    original = access.hash_password

    def spy(password: str, salt: bytes | None = None) -> str:
        made.append(password)
        return original(password, salt)

    monkeypatch.setattr(access, "hash_password", spy)
    settings = config.load(overrides={"PACS_WEB_USER": "bob", "PACS_WEB_PASSWORD": "pw"},
                           environ={}, env_file=None)
    policy = access_policy(settings)
    assert made == []
    assert policy.has_passwords
    assert "pw" not in repr(policy.users["bob"])
    threads = [threading.Thread(target=policy.by_password, args=("bob", "pw"))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert policy.by_password("bob", "wrong") is None
    assert policy.by_password("bob", "pw") is not None
    assert made == ["pw"]
    access.check_password_hash(policy.password_hash(policy.users["bob"]))


@pytest.mark.parametrize(("value", "expected"), [
    ("", frozenset()), ("none", frozenset()), ("all", access.AE_RIGHTS),
    ("Echo, store", frozenset({"echo", "store"}))])
def test_rights_settings(value: str, expected: frozenset[str]) -> None:
    settings = config.load(overrides={"PACS_UNKNOWN_AE_RIGHTS": value}, environ={},
                           env_file=None)
    assert settings.unknown_ae_rights == expected


def test_a_wrong_right_in_the_settings_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="PACS_LOOPBACK_ROLES"):
        config.load(overrides={"PACS_LOOPBACK_ROLES": "read,root"}, environ={},
                    env_file=None)


def _scrypt_hash(password: str, n: int, r: int, p: int = 1) -> str:
    salt = b"s" * 16
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p,
                            maxmem=(1 << 31) - 1, dklen=32)
    return (f"scrypt${n}${r}${p}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def test_a_password_hash_the_node_could_never_check_is_refused_when_read() -> None:
    # A well-formed hash whose scrypt needs more memory than a check may take: read
    # without complaint, it failed every login, each counted as a guess.
    too_big = _scrypt_hash("pw", 1 << 18, 8)
    with pytest.raises(ValueError, match="MiB"):
        access.check_password_hash(too_big)
    with pytest.raises(ConfigError, match="alice"):
        access.parse({"user": [{"name": "alice", "password": too_big, "roles": "read"}]})
    # Just within the limit (n=2^17, r=15: 252 MiB): accepted, and it verifies.
    largest = _scrypt_hash("pw", 1 << 17, 15)
    access.check_password_hash(largest)
    assert access.verify_password("pw", largest)
