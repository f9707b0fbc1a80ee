"""``CurrentTenant``: the tenant whose bearer key signed the request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth.models import Tenant
from app.auth.service import authenticate
from app.db import SessionDep
from app.errors import Unauthorized

# auto_error=False: a missing header is our 401 problem, not FastAPI's plain 403/401.
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer dk_…`")


def current_tenant(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    """The request's tenant; :class:`Unauthorized` without a valid key."""
    if credentials is None:
        raise Unauthorized()
    return authenticate(session, credentials.credentials)


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]
