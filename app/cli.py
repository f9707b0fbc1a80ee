"""Administrative commands: ``python -m app.cli create-api-key --tenant NAME``."""

from __future__ import annotations

import argparse
import sys

from sqlalchemy.orm import Session

from app.auth.service import create_api_key
from app.config import get_settings
from app.db import build_engine


def _create_api_key(args: argparse.Namespace) -> int:
    engine = build_engine(get_settings().database_url)
    try:
        with Session(engine) as session, session.begin():
            issued = create_api_key(session, tenant_name=args.tenant)
            token = issued.token
    finally:
        engine.dispose()
    print(token)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command named in ``argv``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m app.cli", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser(
        "create-api-key", help="issue an API key (creating the tenant if new) and print it"
    )
    create.add_argument("--tenant", required=True, help="the tenant's name")
    create.set_defaults(run=_create_api_key)
    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
