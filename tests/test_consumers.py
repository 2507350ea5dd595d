"""Consumers and credentials in the config: validation with located problems, secrets from
the environment and from files, keys and passwords kept hashed only, and the registry that
authentication plugins look credentials up in."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest

from ferrogate.config import load_config
from ferrogate.consumers import Registry, hash_key, hash_password, verify_password
from ferrogate.runtime_files import runtime_file
from gateway import GatewayFactory, run_cli
from upstreams import Upstream

KEY = "alice-key-0123456789"
PASSWORD = "correct horse battery staple"
HMAC_SECRET = "hmac-secret-for-alice"


def write(tmp_path: Path, consumers: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "listen: [127.0.0.1:0]\n"
        "routes:\n"
        "  - {paths: [/*], upstream: 'http://127.0.0.1:9'}\n"
        "plans: {gold: {}}\n"
        "consumers:\n" + consumers
    )
    return path


def test_credentials_load_with_secrets_from_env_and_files_and_are_stored_hashed(
    tmp_path: Path,
) -> None:
    (tmp_path / "alice.pw").write_text(PASSWORD + "\n")
    path = write(
        tmp_path,
        "  alice:\n"
        "    plan: gold\n"
        "    groups: [admins, beta, admins]\n"
        "    credentials:\n"
        "      - {type: key-auth, key: '${ALICE_KEY}'}\n"
        "      - {type: basic-auth, username: alice, password: {file: alice.pw}}\n"
        f"      - {{type: hmac-auth, key_id: alice-hmac, secret: {HMAC_SECRET}}}\n"
        "      - {type: mtls, subject: 'CN=alice,O=Acme'}\n",
    )
    loaded = load_config(path, env={"ALICE_KEY": KEY})
    alice = loaded.normalized["consumers"]["alice"]
    assert alice["plan"] == "gold"
    assert alice["groups"] == ["admins", "beta"]
    text = loaded.json
    # The key and the password are nowhere in what the workers read; the HMAC secret is (it
    # is needed as it is to verify a signature).
    assert KEY not in text and PASSWORD not in text
    assert HMAC_SECRET in text
    key_cred, basic, hmac_cred, mtls = alice["credentials"]
    assert key_cred == {"type": "key-auth", "id": hash_key(KEY)[:12], "key_sha256": hash_key(KEY)}
    assert verify_password(PASSWORD, basic["password_hash"])
    assert not verify_password(PASSWORD + "!", basic["password_hash"])
    assert hmac_cred["key_id"] == "alice-hmac"
    assert mtls["subject"] == "CN=alice,O=Acme"

    registry = Registry(loaded.normalized["consumers"])
    found = registry.by_api_key(KEY)
    assert found is not None and found.consumer == "alice" and found.id == hash_key(KEY)[:12]
    assert registry.by_api_key(KEY + "x") is None
    assert registry.find("basic-auth", "alice") is not None
    assert registry.find("hmac-auth", "alice-hmac") is not None
    consumer = registry.get("alice")
    assert consumer is not None and consumer.groups == {"admins", "beta"}
    # The credential's repr is safe to log: no hash, no secret.
    assert hash_key(KEY) not in repr(found)
    assert HMAC_SECRET not in repr(registry.of_type("hmac-auth"))


def test_bad_credentials_are_reported_with_their_place(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "  alice:\n"
        "    credentials:\n"
        "      - {type: key-auth, key: shared-key-123}\n"
        "      - {type: api-key, key: x}\n"
        "      - {type: basic-auth, username: alice, password: {file: missing.pw}}\n"
        "      - {type: basic-auth, username: al, password: p, password_hash: 'scrypt$1'}\n"
        "      - {type: key-auth, key: short}\n"
        "  bob:\n"
        "    plan: silver\n"
        "    credentials:\n"
        "      - {type: key-auth, key: shared-key-123}\n",
    )
    result = run_cli("check", str(path))
    assert result.returncode != 0
    out = result.stderr + result.stdout
    assert (
        f"{path}:9:9: consumers.alice.credentials[1]: unknown type 'api-key' (one of: key-auth,"
        in out
    )
    assert "consumers.alice.credentials[2].password.file: cannot read the secret file" in out
    assert "missing.pw" in out
    both = "give exactly one of 'password' or 'password_hash'"
    assert f"consumers.alice.credentials[3]: {both}" in out
    assert "consumers.alice.credentials[4].key: an API key needs at least 8 characters" in out
    assert "consumers.bob.plan: unknown plan 'silver'" in out
    assert "consumers.bob.credentials[0]: this key-auth credential is already alice's" in out
    # Problems name where a secret is, never what it is.
    assert "shared-key-123" not in out


def test_a_password_hash_can_be_given_instead_of_the_password(tmp_path: Path) -> None:
    encoded = hash_password(PASSWORD)
    path = write(
        tmp_path,
        "  alice:\n"
        "    credentials:\n"
        f"      - {{type: basic-auth, username: alice, password_hash: '{encoded}'}}\n",
    )
    basic = load_config(path).normalized["consumers"]["alice"]["credentials"][0]
    assert basic["password_hash"] == encoded
    assert verify_password(PASSWORD, basic["password_hash"])


def test_the_runtime_file_with_secrets_is_readable_by_the_gateway_user_only(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = gateway(
        {
            "upstreams": {"u": {"targets": [upstream.address]}},
            "routes": [{"paths": ["/*"], "upstream": "u"}],
            "consumers": {
                "alice": {
                    "credentials": [
                        {"type": "key-auth", "key": KEY},
                        {"type": "hmac-auth", "key_id": "a", "secret": HMAC_SECRET},
                    ]
                }
            },
        },
        workers=1,
    )
    runtime = runtime_file(gw.pid_file)
    mode = stat.S_IMODE(runtime.stat().st_mode)
    assert mode == 0o600, oct(mode)
    text = runtime.read_text()
    assert KEY not in text
    assert json.loads(text)["consumers"]["alice"]["credentials"][0]["key_sha256"] == hash_key(KEY)
    assert gw.get("/").status_code == 200


@pytest.mark.parametrize("key", ["", "bench-key-4f3a2b1c0d9e8f7a", "caf\xe9", "\u2603", "k" * 200])
def test_api_keys_hash_as_hashlib_sha256_does(key: str) -> None:
    # Keys stored by one release are looked up by the next: the digest must never change.
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()


def test_hashing_a_key_that_is_not_text_fails() -> None:
    with pytest.raises(UnicodeEncodeError):
        hash_key("\ud800")
    with pytest.raises(TypeError):
        hash_key(b"bytes")  # type: ignore[arg-type]
