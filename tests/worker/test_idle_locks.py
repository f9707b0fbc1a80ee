"""A worker stopped inside a transaction does not keep its job's row locked for good.

The reconciler skips locked rows (two reconcilers never act on one job), so a worker
paused between its UPDATE of the job and its COMMIT would otherwise keep the job from
being handed to another worker for as long as it stays paused. PostgreSQL only: the
session is ended by the server.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.auth.models import Tenant
from tests.app.servers import wait_until
from tests.worker.postgres import database_url, engine  # noqa: F401 - fixtures, by name
from worker.runner import release_locks_when_idle

#: How long the stuck transaction may sit idle before the server ends it.
IDLE_S = 2.0


def test_a_transaction_left_idle_releases_its_row_lock(engine: sa.Engine) -> None:  # noqa: F811
    with Session(engine) as session, session.begin():
        tenant = Tenant(name="idle-locks")
        session.add(tenant)
        session.flush()
        tenant_id = tenant.id
    rename = sa.update(Tenant).where(Tenant.id == tenant_id).values(name="renamed")
    unlocked = sa.select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(skip_locked=True)

    def free() -> bool:
        with engine.connect() as connection:
            return connection.execute(unlocked).first() is not None

    stuck = Session(engine)
    stuck.begin()
    release_locks_when_idle(stuck, IDLE_S)
    stuck.execute(rename)
    # The session now sits inside its transaction, as a paused worker's would.
    assert not free(), "the row is locked while the transaction is open"
    wait_until(free, "the idle transaction's lock to be released", 10 * IDLE_S)
    with pytest.raises(sa.exc.DBAPIError):
        stuck.commit()
    stuck.close()
    with engine.connect() as connection:
        name = connection.execute(sa.select(Tenant.name).where(Tenant.id == tenant_id)).scalar()
    assert name == "idle-locks", "the ended transaction wrote nothing"
