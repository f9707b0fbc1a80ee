"""API keys: issued once, stored as a hash, accepted only whole; and the CLI that prints one."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.auth.models import ApiKey
from app.auth.service import authenticate, create_api_key
from app.errors import Unauthorized
from tests.app.databases import REPO


def test_a_key_is_stored_only_as_a_hash_and_authenticates(engine: sa.Engine) -> None:
    with Session(engine) as session, session.begin():
        issued = create_api_key(session, tenant_name="acme")
    prefix, key_id, secret = issued.token.split("_", 2)
    assert prefix == "dk"
    with Session(engine) as session:
        row = session.scalars(sa.select(ApiKey)).one()
        assert row.key_id == key_id
        assert row.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
        assert secret not in (row.secret_hash, row.key_id)
        assert authenticate(session, issued.token).name == "acme"
        for bad in ("", "dk", f"dk_{key_id}_", f"dk_{key_id}_{secret}x", f"xx_{key_id}_{secret}"):
            with pytest.raises(Unauthorized):
                authenticate(session, bad)


def test_a_second_key_for_a_tenant_reuses_the_tenant(engine: sa.Engine) -> None:
    with Session(engine) as session, session.begin():
        first = create_api_key(session, tenant_name="acme")
        second = create_api_key(session, tenant_name="acme")
        assert first.tenant.id == second.tenant.id and first.token != second.token


def test_cli_prints_a_working_key(database_url: str, engine: sa.Engine) -> None:
    env = {**os.environ, "DISTILL_DATABASE_URL": database_url}
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "create-api-key", "--tenant", "cli-tenant"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    token = out.stdout.strip()
    with Session(engine) as session:
        assert authenticate(session, token).name == "cli-tenant"
