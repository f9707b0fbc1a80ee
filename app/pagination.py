"""Cursor pagination: newest first, resumable with an opaque ``after`` cursor.

A cursor encodes the last item's ``(created_at, id)``; the next page holds the
rows strictly older in that order, so inserts and deletes between requests
never make a page repeat or skip a row.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel

from app.errors import FieldError, Unprocessable

T = TypeVar("T")

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
#: Longer than any cursor :meth:`Cursor.encode` writes.
MAX_CURSOR_CHARS = 200


@dataclass(frozen=True)
class Cursor:
    """The position after which a page starts."""

    created_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        """The cursor as an opaque URL-safe string."""
        raw = f"{self.created_at.isoformat()}|{self.id.hex}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, value: str) -> Cursor:
        """Parse :meth:`encode`'s output; :class:`Unprocessable` naming ``after`` otherwise."""
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
            when, _, ident = raw.partition("|")
            created_at = datetime.fromisoformat(when)
            if created_at.tzinfo is None:
                raise ValueError("naive timestamp")
            # In UTC, as the database compares it: year 1 at +14:00 is before datetime.min.
            return cls(created_at.astimezone(UTC), uuid.UUID(hex=ident))
        except (ValueError, OverflowError):
            raise Unprocessable(
                "invalid cursor: pass the next_cursor of a previous page",
                code="validation_error",
                errors=[FieldError(field="query.after", reason="invalid cursor")],
            ) from None


class Page(BaseModel, Generic[T]):
    """One page of a list, newest first; ``next_cursor`` is null on the last page."""

    data: list[T]
    next_cursor: str | None


@dataclass(frozen=True)
class PageParams:
    """``limit`` and the decoded ``after`` cursor of a list request."""

    limit: int
    after: Cursor | None


def page_params(
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="items per page")] = DEFAULT_LIMIT,
    after: Annotated[
        str | None,
        Query(max_length=MAX_CURSOR_CHARS, description="the next_cursor of the previous page"),
    ] = None,
) -> PageParams:
    """The pagination query parameters of a list endpoint."""
    return PageParams(limit, None if after is None else Cursor.decode(after))
