"""``/v1/webhook-secret``: the tenant's key for verifying webhook signatures, and its rotation."""

from __future__ import annotations

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from app.auth.dependencies import CurrentTenant
from app.db import SessionDep
from app.errors import Unauthorized, responses
from app.webhooks import service

router = APIRouter(
    prefix="/v1/webhook-secret", tags=["webhooks"], responses=responses(Unauthorized)
)


class WebhookSecretOut(BaseModel):
    """The key of the tenant's webhook signatures.

    Each delivery carries ``Distillery-Timestamp: T`` and
    ``Distillery-Signature: v1=HEX``, where HEX is the HMAC-SHA256 of
    ``f"{T}."`` followed by the raw body, keyed by this secret.
    """

    secret: str = Field(description="the HMAC-SHA256 key (UTF-8) of webhook signatures")


def _no_store(response: Response) -> None:
    # A secret: no cache on the way may keep it.
    response.headers["Cache-Control"] = "no-store"


@router.get("", summary="Read the webhook signing secret")
def read_webhook_secret(tenant: CurrentTenant, response: Response) -> WebhookSecretOut:
    """The secret that signs the tenant's webhook deliveries."""
    _no_store(response)
    return WebhookSecretOut(secret=service.webhook_secret(tenant))


@router.post("/rotate", summary="Rotate the webhook signing secret")
def rotate_webhook_secret(
    tenant: CurrentTenant, session: SessionDep, response: Response
) -> WebhookSecretOut:
    """Replace the secret with a new random one and return it.

    Deliveries sent from now on, retries of earlier ones included, are signed
    with the new secret; the old one stops verifying at once.
    """
    _no_store(response)
    return WebhookSecretOut(secret=service.rotate_webhook_secret(session, tenant=tenant))
