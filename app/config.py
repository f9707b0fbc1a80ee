"""Settings shared by the API, the CLI and (later) the worker: one class, prefix ``DISTILL_``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

from fastapi import Depends, Request
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Distillery's configuration, read from ``DISTILL_*`` environment variables.

    The defaults are the embedded setting of ``make serve``: everything lives
    under ``var/`` in the working directory.
    """

    model_config = SettingsConfigDict(env_prefix="DISTILL_", extra="ignore")

    database_url: str = "sqlite:///var/distillery.db"
    broker_url: str = "filesystem://"
    storage_url: str = "file://var/artifacts"
    max_upload_bytes: int = 10 * 2**30
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def storage_root(self) -> Path:
        """The folder of a ``file://`` storage URL (relative URLs are taken from the cwd)."""
        parsed = urlparse(self.storage_url)
        if parsed.scheme != "file":
            raise ValueError(
                f"DISTILL_STORAGE_URL {self.storage_url!r}: only file:// storage is supported yet"
            )
        # file://var/artifacts parses "var" as the host: join it back into a relative path.
        return Path(parsed.netloc + parsed.path)


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()


def get_app_settings(request: Request) -> Settings:
    """The settings the application was built with (see :func:`app.main.create_app`)."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
