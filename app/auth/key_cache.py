"""Bearer keys checked against a short-lived in-process cache of their hashes.

Polling clients send the same key many times a second; reading it from the
database each time would double the cost of a status read. The cache keeps,
per key id, the secret's hash and its tenant for ``DISTILL_AUTH_CACHE_S``
(a second by default), so a revoked key stops working within that long.
Concurrent misses of one key share one database read.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.auth.repository import AuthRepository
from app.auth.service import DUMMY_HASH, hash_secret, split_token
from app.db import run_database_call
from app.errors import Unauthorized

#: Keys remembered at most; past it the cache starts afresh (a flood of unknown key ids
#: must not grow memory).
MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class Principal:
    """Who signed a request: the tenant of its API key."""

    tenant_id: uuid.UUID
    tenant_name: str


@dataclass(frozen=True)
class _Entry:
    #: ``None`` when the key id is unknown or revoked.
    secret_hash: str | None
    principal: Principal | None
    expires_at: float


def _read_key(factory: sessionmaker[Session], key_id: str) -> tuple[str, Principal] | None:
    with factory() as session:
        found = AuthRepository(session).active_key(key_id)
    if found is None:
        return None
    key, tenant = found
    return key.secret_hash, Principal(tenant.id, tenant.name)


class ApiKeyCache:
    """Authenticates bearer tokens, reading each key id at most once per ``ttl_s``."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, _Entry] = {}
        self._loading: dict[str, asyncio.Future[_Entry]] = {}

    async def authenticate(self, app: Any, token: str) -> Principal:
        """The principal of bearer ``token``; :class:`Unauthorized` for anything else."""
        key_id, secret = split_token(token)
        entry = None
        if key_id:
            entry = self._entries.get(key_id)
            if entry is None or entry.expires_at <= time.monotonic():
                entry = await self._load(app, key_id)
        expected = entry.secret_hash if entry and entry.secret_hash else DUMMY_HASH
        if not hmac.compare_digest(expected, hash_secret(secret)) or entry is None:
            raise Unauthorized("the API key is not valid")
        if entry.principal is None:
            raise Unauthorized("the API key is not valid")
        return entry.principal

    def cached(self, token: str) -> Principal | None:
        """The principal of ``token`` if its key is held and unexpired and the secret matches;
        ``None`` otherwise, without reading anything (:meth:`authenticate` decides then)."""
        key_id, secret = split_token(token)
        entry = self._entries.get(key_id) if key_id else None
        if entry is None or entry.expires_at <= time.monotonic() or entry.secret_hash is None:
            return None
        if not hmac.compare_digest(entry.secret_hash, hash_secret(secret)):
            return None
        return entry.principal

    async def _load(self, app: Any, key_id: str) -> _Entry:
        loading = self._loading.get(key_id)
        if loading is None:
            loading = asyncio.ensure_future(self._fetch(app, key_id))
            self._loading[key_id] = loading
            loading.add_done_callback(lambda _: self._loading.pop(key_id, None))
        # Shielded: one cancelled request must not cancel the read others wait on.
        return await asyncio.shield(loading)

    async def _fetch(self, app: Any, key_id: str) -> _Entry:
        found = await run_database_call(app, _read_key, app.state.session_factory, key_id)
        expires_at = time.monotonic() + self.ttl_s
        entry = _Entry(None, None, expires_at) if found is None else _Entry(*found, expires_at)
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[key_id] = entry
        return entry
