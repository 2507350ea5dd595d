"""Consumers and their credentials: the config schema, its normalization, and the registry
authentication plugins look credentials up in.

A consumer is someone the gateway can recognize: it has groups (for ACLs), a plan (limits
and quotas) and credentials, one or more per kind. Secrets are written inline (use
``${VAR}`` to take them from the environment) or as ``{file: PATH}``; they are read when the
config loads. Stored keys and passwords are kept hashed only: key-auth keys as SHA-256
(they are long random strings, so a fast hash is safe and lookups stay O(1)), passwords
with scrypt. Secrets that verification needs as they are (HMAC and JWT HS* keys) stay
readable in the runtime file, which only the gateway's user can read.

Plugins get the registry of the config in force with ``ferrogate.consumers.current()``;
no credential, hash or secret is ever part of a log line or an error body.
"""

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ferrogate._core import sha256_hex
from ferrogate.problems import DataPath

__all__ = [
    "CREDENTIAL_TYPES",
    "Consumer",
    "ConsumerSpec",
    "Credential",
    "Registry",
    "SecretFile",
    "checking",
    "current",
    "hash_key",
    "hash_password",
    "install",
    "normalize_consumer",
    "verify_password",
]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class SecretFile(_Section, kw_only=True, frozen=True):
    """A secret read from a file (its content, trailing newline removed)."""

    file: Annotated[str, Meta(description="Path, relative to the config file.")]


Secret = Annotated[
    str | SecretFile,
    Meta(description="The secret inline (${VAR} for an environment variable) or {file: PATH}."),
]


class KeyAuthCredential(_Section, tag="key-auth", tag_field="type", kw_only=True, frozen=True):
    """An API key (key-auth plugin). Stored as its SHA-256 only; `key_sha256` takes that
    digest instead of the key (the admin API's store keeps keys this way)."""

    key: Secret | None = None
    key_sha256: Annotated[
        Annotated[str, Meta(pattern="^[0-9a-f]{64}$")] | None,
        Meta(description="The key's SHA-256, lower-case hex."),
    ] = None


class BasicAuthCredential(_Section, tag="basic-auth", tag_field="type", kw_only=True, frozen=True):
    """A username and password (basic-auth plugin). The password is stored hashed (scrypt);
    `password_hash` takes one made with `ferrogate hash-password`."""

    username: str
    password: Secret | None = None
    password_hash: str | None = None


class HmacCredential(_Section, tag="hmac-auth", tag_field="type", kw_only=True, frozen=True):
    """A key id and shared secret for signed requests (hmac-auth plugin)."""

    key_id: str
    secret: Secret


class JwtCredential(_Section, tag="jwt", tag_field="type", kw_only=True, frozen=True):
    """Tokens whose `key_claim` (iss by default, see the jwt plugin) equals `key` belong to
    this consumer; verified with `secret` (HS*) or `public_key` (PEM; RS*, PS*, ES*, EdDSA)."""

    key: str
    algorithm: str = "HS256"
    secret: Secret | None = None
    public_key: Secret | None = None


class MtlsCredential(_Section, tag="mtls", tag_field="type", kw_only=True, frozen=True):
    """A verified client certificate whose subject or a SAN (DNS, URI or email) matches."""

    subject: str | None = None
    san: str | None = None


CredentialSpec = (
    KeyAuthCredential | BasicAuthCredential | HmacCredential | JwtCredential | MtlsCredential
)
CREDENTIAL_TYPES = ("key-auth", "basic-auth", "hmac-auth", "jwt", "mtls")


class ConsumerSpec(_Section, kw_only=True, frozen=True):
    """Someone an authentication plugin recognizes (it sets the request's consumer)."""

    plan: Annotated[str | None, Meta(description="The plan whose limits apply.")] = None
    groups: Annotated[list[str], Meta(description="Groups, for `acl` rules.")] = []
    credentials: Annotated[
        list[CredentialSpec], Meta(description="How this consumer proves who it is.")
    ] = []
    tags: Annotated[dict[str, str], Meta(description="Free-form labels.")] = {}


# --- hashing -------------------------------------------------------------------------------

_SCRYPT = {"n": 1 << 14, "r": 8, "p": 1}
_HASH = re.compile(r"^scrypt\$(\d+)\$(\d+)\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")


hash_key: Callable[[str], str] = sha256_hex
"""The stored form of an API key: the SHA-256 of its UTF-8 bytes, in lower-case hex.
(``_core``'s, as ``hashlib`` computes it but in one call: key-auth hashes every request's
key.)"""


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64), as ``verify_password`` reads it."""
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    b64 = base64.b64encode
    return (
        f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}$"
        f"{b64(salt).decode()}${b64(digest).decode()}"
    )


def valid_password_hash(encoded: str) -> bool:
    return _HASH.fullmatch(encoded) is not None


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check of ``password`` against a ``hash_password`` string."""
    m = _HASH.fullmatch(encoded)
    if m is None:
        return False
    n, r, p = (int(m.group(i)) for i in (1, 2, 3))
    salt = base64.b64decode(m.group(4))
    want = base64.b64decode(m.group(5))
    got = hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(want), maxmem=1 << 26
    )
    return hmac.compare_digest(got, want)


# --- normalization -------------------------------------------------------------------------


def read_secret(
    value: str | SecretFile,
    base_dir: Path,
    report: Callable[[DataPath, str], None],
    at: DataPath,
    what: str = "secret",
) -> str:
    """A secret given inline or as ``{file: PATH}`` (relative to ``base_dir``)."""
    if isinstance(value, str):
        return value
    path = base_dir / value.file
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as e:
        # The error names the file, never its content.
        report((*at, "file"), f"cannot read the {what} file {path}: {e.strerror or e}")
        return ""


def normalize_consumer(
    spec: ConsumerSpec,
    at: DataPath,
    base_dir: Path,
    report: Callable[[DataPath, str], None],
) -> dict[str, Any]:
    """A consumer's normalized form (``plan`` is checked by the caller)."""
    creds: list[dict[str, Any]] = []
    for j, c in enumerate(spec.credentials):
        where: DataPath = (*at, "credentials", j)

        def secret(value: str | SecretFile, key: str, where: DataPath = where) -> str:
            return read_secret(value, base_dir, report, (*where, key))

        if isinstance(c, KeyAuthCredential):
            if (c.key is None) == (c.key_sha256 is None):
                report(where, "give exactly one of 'key' or 'key_sha256'")
                continue
            if c.key is not None:
                key = secret(c.key, "key")
                if len(key) < 8:
                    report((*where, "key"), "an API key needs at least 8 characters")
                digest = hash_key(key)
            else:
                digest = str(c.key_sha256)
            creds.append({"type": "key-auth", "id": digest[:12], "key_sha256": digest})
        elif isinstance(c, BasicAuthCredential):
            if (c.password is None) == (c.password_hash is None):
                report(where, "give exactly one of 'password' or 'password_hash'")
                continue
            if c.password_hash is not None:
                if not valid_password_hash(c.password_hash):
                    report((*where, "password_hash"), "not a scrypt$N$r$p$salt$hash string")
                encoded = c.password_hash
            else:
                encoded = hash_password(secret(c.password, "password"))  # type: ignore[arg-type]
            creds.append(
                {
                    "type": "basic-auth",
                    "id": c.username,
                    "username": c.username,
                    "password_hash": encoded,
                }
            )
        elif isinstance(c, HmacCredential):
            creds.append(
                {
                    "type": "hmac-auth",
                    "id": c.key_id,
                    "key_id": c.key_id,
                    "secret": secret(c.secret, "secret"),
                }
            )
        elif isinstance(c, JwtCredential):
            if (c.secret is None) == (c.public_key is None):
                report(where, "give exactly one of 'secret' (HS*) or 'public_key'")
            jwt_secret = None if c.secret is None else secret(c.secret, "secret")
            jwt_public = None if c.public_key is None else secret(c.public_key, "public_key")
            _check_jwt_key(c.algorithm, jwt_secret, jwt_public, where, report)
            creds.append(
                {
                    "type": "jwt",
                    "id": c.key,
                    "key": c.key,
                    "algorithm": c.algorithm,
                    "secret": jwt_secret,
                    "public_key": jwt_public,
                }
            )
        else:
            if c.subject is None and c.san is None:
                report(where, "give 'subject', 'san' or both")
            creds.append(
                {"type": "mtls", "id": c.subject or c.san, "subject": c.subject, "san": c.san}
            )
    return {
        "plan": spec.plan,
        "groups": sorted(set(spec.groups)),
        "credentials": creds,
        "tags": dict(spec.tags),
    }


def _check_jwt_key(
    algorithm: str,
    secret: str | None,
    public_key: str | None,
    where: DataPath,
    report: Callable[[DataPath, str], None],
) -> None:
    """A jwt credential's key must fit its algorithm: a secret for HS*, a public key of the
    algorithm's type otherwise (so a key can never verify a token of another family)."""
    from ferrogate.plugins.jwt_keys import ALGORITHMS, HMAC_ALGORITHMS, prepare_key

    if algorithm not in ALGORITHMS:
        report((*where, "algorithm"), f"{algorithm!r} is not one of {', '.join(ALGORITHMS)}")
        return
    hmac_alg = algorithm in HMAC_ALGORITHMS
    field_name = "secret" if hmac_alg else "public_key"
    text = secret if hmac_alg else public_key
    if text is None:
        if (secret is None) != (public_key is None):
            report((*where, field_name), f"{algorithm} needs '{field_name}'")
        return
    try:
        prepare_key(algorithm, text, field_name)
    except ValueError as e:
        report((*where, field_name), str(e).removeprefix(f"{field_name}: "))


def duplicate_credentials(consumers: Mapping[str, dict[str, Any]]) -> list[tuple[DataPath, str]]:
    """Credentials that would identify two consumers (or one twice): same API key, username,
    key id, JWT key or certificate."""
    seen: dict[tuple[str, str], str] = {}
    problems: list[tuple[DataPath, str]] = []
    for name, c in consumers.items():
        for j, cred in enumerate(c["credentials"]):
            index = (cred["type"], _index_value(cred))
            if index in seen:
                problems.append(
                    (
                        ("consumers", name, "credentials", j),
                        f"this {cred['type']} credential is already {seen[index]}'s",
                    )
                )
            else:
                seen[index] = name
    return problems


def _index_value(cred: Mapping[str, Any]) -> str:
    """What a credential is looked up by."""
    kind = cred["type"]
    if kind == "key-auth":
        return str(cred["key_sha256"])
    if kind == "mtls":
        return f"{cred.get('subject') or ''}|{cred.get('san') or ''}"
    return str(cred["id"])


# --- the registry --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credential:
    consumer: str
    type: str
    id: str
    """A name for the credential that is safe to log (never the secret)."""
    data: Mapping[str, Any] = field(repr=False)
    """The normalized credential (hashes, and the secrets HMAC and JWT need)."""


@dataclass(frozen=True, slots=True)
class Consumer:
    name: str
    groups: frozenset[str]
    plan: str | None
    credentials: tuple[Credential, ...] = field(repr=False)
    tags: Mapping[str, str] = field(default_factory=dict)


class Registry:
    """The consumers of one config generation, indexed for credential lookups."""

    def __init__(self, consumers: Mapping[str, Mapping[str, Any]]) -> None:
        self._consumers: dict[str, Consumer] = {}
        self._index: dict[tuple[str, str], Credential] = {}
        for name, c in consumers.items():
            creds = tuple(
                Credential(name, cred["type"], str(cred["id"]), cred)
                for cred in c.get("credentials", ())
            )
            self._consumers[name] = Consumer(
                name, frozenset(c.get("groups", ())), c.get("plan"), creds, c.get("tags", {})
            )
            for cred in creds:
                self._index.setdefault((cred.type, _index_value(cred.data)), cred)

    def get(self, name: str | None) -> Consumer | None:
        return None if name is None else self._consumers.get(name)

    def __iter__(self) -> Iterator[Consumer]:
        return iter(self._consumers.values())

    def __len__(self) -> int:
        return len(self._consumers)

    def find(
        self, type: Literal["key-auth", "basic-auth", "hmac-auth", "jwt"], value: str
    ) -> Credential | None:
        """The credential of ``type`` looked up by what identifies it: the SHA-256 of an API
        key (``hash_key``), a basic-auth username, an HMAC key id, a JWT credential's key."""
        return self._index.get((type, value))

    def by_api_key(self, key: str) -> Credential | None:
        return self._index.get(("key-auth", hash_key(key)))

    def of_type(self, type: str) -> list[Credential]:
        return [
            c
            for consumer in self._consumers.values()
            for c in consumer.credentials
            if c.type == type
        ]


_current = Registry({})


def install(consumers: Mapping[str, Mapping[str, Any]]) -> Registry:
    """Make ``consumers`` (normalized) the registry plugins see; the plugin host calls this
    when it loads a config generation."""
    global _current
    _current = Registry(consumers)
    return _current


_checking: ContextVar[Registry | None] = ContextVar("ferrogate_consumers_checking", default=None)


@contextmanager
def checking(consumers: Mapping[str, Mapping[str, Any]]) -> Iterator[Registry]:
    """While a config is being checked, ``current()`` in this thread returns its consumers:
    plugins made to validate their settings can check the consumers they name (such as an
    ``anonymous`` one) against the config they belong to."""
    registry = Registry(consumers)
    token = _checking.set(registry)
    try:
        yield registry
    finally:
        _checking.reset(token)


def current() -> Registry:
    """The consumers of the config in force (of the config being checked, during
    ``checking``)."""
    checked = _checking.get()
    return _current if checked is None else checked
