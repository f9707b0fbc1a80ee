"""``CurrentPrincipal`` and ``CurrentTenant``: who signed the request with their bearer key.

Both authenticate through the process's :class:`~app.auth.key_cache.ApiKeyCache`
without touching the request's session, so a request holds no database
connection while it authenticates or while its body streams in afterwards.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import make_transient_to_detached

from app.auth.key_cache import ApiKeyCache, Principal
from app.auth.models import Tenant
from app.db import SessionDep
from app.errors import Unauthorized

# auto_error=False: a missing header is our 401 problem, not FastAPI's plain 403/401.
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer dk_…`")


async def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The tenant id and name of the request's key; :class:`Unauthorized` without a valid one."""
    if credentials is None:
        raise Unauthorized()
    cache: ApiKeyCache = request.app.state.api_key_cache
    return await cache.authenticate(request.app, credentials.credentials)


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


async def current_tenant(principal: CurrentPrincipal, session: SessionDep) -> Tenant:
    """The request's tenant as a row of the request's session, read from it only if used.

    ``merge(load=False)`` attaches the known id without a query; other columns
    (the webhook secret) load on first access, fresh from the database.
    """
    tenant = Tenant(id=principal.tenant_id, name=principal.tenant_name)
    make_transient_to_detached(tenant)
    return session.merge(tenant, load=False)


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]
