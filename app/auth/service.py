"""API keys: issue, and authenticate a bearer token.

A key reads ``dk_<key_id>_<secret>``. Only the secret's sha256 is stored;
authentication finds the row by ``key_id`` and compares hashes in constant
time, so neither a database dump nor response timing reveals a usable key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.auth.models import ApiKey, Tenant
from app.auth.repository import AuthRepository
from app.errors import Unauthorized

KEY_PREFIX = "dk"
_KEY_ID_BYTES = 8
_SECRET_BYTES = 32
#: A stand-in hash compared when the key id is unknown, so that case costs the same time.
DUMMY_HASH = hashlib.sha256(b"distillery").hexdigest()


@dataclass(frozen=True)
class IssuedKey:
    """A new key: ``token`` is shown once and never stored."""

    token: str
    tenant: Tenant
    api_key: ApiKey


def hash_secret(secret: str) -> str:
    """The stored form of a key's secret: its sha256, in hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def split_token(token: str) -> tuple[str, str]:
    """``(key_id, secret)`` of a ``dk_<key_id>_<secret>`` token; empty strings if malformed."""
    prefix, _, rest = token.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != KEY_PREFIX or not key_id or not secret:
        return "", secret
    return key_id, secret


def create_api_key(session: Session, *, tenant_name: str) -> IssuedKey:
    """Issue a key for tenant ``tenant_name``, creating the tenant on first use."""
    repo = AuthRepository(session)
    tenant = repo.tenant_by_name(tenant_name)
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        repo.add(tenant)
    # Hex key ids never contain the "_" that separates the token's parts.
    key_id = secrets.token_hex(_KEY_ID_BYTES)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    api_key = ApiKey(tenant_id=tenant.id, key_id=key_id, secret_hash=hash_secret(secret))
    repo.add(api_key)
    return IssuedKey(f"{KEY_PREFIX}_{key_id}_{secret}", tenant, api_key)


def authenticate(session: Session, token: str) -> Tenant:
    """The tenant of bearer ``token``; :class:`Unauthorized` for anything else.

    Reads the key every time; requests go through :class:`app.auth.key_cache.ApiKeyCache`.
    """
    key_id, secret = split_token(token)
    found = AuthRepository(session).active_key(key_id) if key_id else None
    expected = found[0].secret_hash if found else DUMMY_HASH
    if not hmac.compare_digest(expected, hash_secret(secret)) or found is None:
        raise Unauthorized("the API key is not valid")
    return found[1]
