"""HTTP Basic authentication (RFC 7617) against the consumers' ``basic-auth`` credentials."""

import asyncio
import base64
import binascii
import functools
import hashlib
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

from msgspec import Meta

from ferrogate import auth
from ferrogate.consumers import current, hash_password, verify_password
from ferrogate.hooks import Request, Response
from ferrogate.plugin import Plugin

__all__ = ["BasicAuth", "VerifiedCache"]

# scrypt is slow on purpose (tens of milliseconds) and releases the GIL: it runs on these
# threads, never on the worker's I/O thread, where it would stall every other connection.
# Two threads bound the CPU a flood of wrong passwords can take from one worker.
_verifier = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ferrogate-scrypt")


@functools.cache
def _decoy_hash() -> str:
    """Verified against when the username is unknown, so that an unknown user costs as long
    as a wrong password and response times do not tell which usernames exist."""
    return hash_password(os.urandom(16).hex())


def _verify_decoy(password: str) -> bool:
    return verify_password(password, _decoy_hash())


class VerifiedCache:
    """Recently verified (username, password, stored hash) triples, per worker, so that a
    client sending the same credentials again is checked in microseconds.

    Entries are keyed by a salted SHA-256 of the triple (the salt is random per process:
    the cache holds nothing a leaked memory image could test guesses against faster than
    scrypt would let it), expire after ``ttl`` seconds, and the oldest go beyond ``size``.
    Only successes are kept: a failure is never remembered, so guessing costs a full scrypt
    every time. Since the stored hash is part of the key, a changed password invalidates
    the entry at the next reload.
    """

    def __init__(self, ttl: float, size: int) -> None:
        self.ttl = ttl
        self.size = size
        self._salt = os.urandom(32)
        self._entries: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def key(self, username: str, password: str, stored: str) -> bytes:
        h = hashlib.sha256(self._salt)
        for part in (username, password, stored):
            data = part.encode()
            h.update(len(data).to_bytes(4, "big"))
            h.update(data)
        return h.digest()

    def __contains__(self, key: bytes) -> bool:
        if self.size == 0:
            return False
        now = time.monotonic()
        with self._lock:
            expires = self._entries.get(key)
            if expires is not None and expires > now:
                self._entries.move_to_end(key)
                self.hits += 1
                return True
            if expires is not None:
                del self._entries[key]
            self.misses += 1
            return False

    def add(self, key: bytes) -> None:
        if self.size == 0:
            return
        with self._lock:
            self._entries[key] = time.monotonic() + self.ttl
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def parse_basic(value: str) -> tuple[str, str] | None:
    """``(username, password)`` from an ``Authorization: Basic ...`` value; None when it is
    not Basic or does not decode."""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    username, sep, password = decoded.partition(":")
    if not sep:
        return None
    return username, password


class BasicAuth(Plugin):
    """Identifies the consumer by a username and password (``Authorization: Basic``).

    The username selects a ``basic-auth`` credential and the password is checked against
    its scrypt hash. scrypt is slow by design, so successful checks are remembered per
    worker for ``cache_ttl`` seconds (up to ``cache_size`` of them; 0 turns this off) and
    the same credentials are then accepted in microseconds; failures are never remembered.
    Checks run on two threads of the worker, away from its I/O thread.

    A request without Basic credentials (no ``Authorization`` header, or another scheme)
    gets 401 (or continues as the ``anonymous`` consumer); a wrong username or password
    gets 401 "invalid username or password", whichever it was. Both carry
    ``WWW-Authenticate: Basic realm="...", charset="UTF-8"``. With ``hide_credentials`` the
    ``Authorization`` header is not sent upstream.
    """

    name = "basic-auth"
    priority = auth.PRIORITY + 100

    class Config(auth.AuthConfig, forbid_unknown_fields=True, kw_only=True, frozen=True):
        """Settings of basic-auth."""

        cache_ttl: Annotated[
            float,
            Meta(ge=0, description="Seconds a verified username and password stay trusted."),
        ] = 60.0
        cache_size: Annotated[
            int, Meta(ge=0, description="Verified credentials remembered per worker (0: off).")
        ] = 10000

    config: "BasicAuth.Config"

    def __init__(self, config: "BasicAuth.Config") -> None:
        super().__init__(config)
        auth.check_config(config)
        self.cache = VerifiedCache(config.cache_ttl, config.cache_size if config.cache_ttl else 0)

    def _refuse(self, req: Request, message: str) -> Response:
        return auth.unauthorized(
            req, message, scheme="Basic", realm=self.config.realm, params={"charset": "UTF-8"}
        )

    async def on_request(self, req: Request) -> Response | None:
        c = self.config
        if auth.skip(req, c):
            return None
        header = req.headers.get("authorization")
        given = None if header is None else parse_basic(header)
        if given is None:
            if header is not None and header.lstrip()[:6].lower() == "basic ":
                return self._refuse(req, "malformed Basic credentials")
            return auth.fallback(req, c, self._refuse(req, "no username and password"))
        username, password = given
        credential = current().find("basic-auth", username)
        if credential is None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(_verifier, _verify_decoy, password)
            return self._refuse(req, "invalid username or password")
        stored = credential.data["password_hash"]
        key = self.cache.key(username, password, stored)
        if key not in self.cache:
            loop = asyncio.get_running_loop()
            if not await loop.run_in_executor(_verifier, verify_password, password, stored):
                return self._refuse(req, "invalid username or password")
            self.cache.add(key)
        auth.identify(req, credential, c)
        if c.hide_credentials:
            req.headers.remove("authorization")
        return None
