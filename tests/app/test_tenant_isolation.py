"""Tenant isolation, route by route: another tenant's ids answer 404 on every route.

The walks enumerate the application's own routes rather than a hand-kept list,
and every route needs an entry in :data:`ROUTES` saying how to call it, so a
new route fails here until someone decides what isolation means for it. Each
call is made as globex on acme's resources (refused as unknown, nothing of
acme's changed), as acme (answered, so globex's 404 is not a broken route) and
without a valid key (401).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.jobs.models import Job, JobArtifact
from app.jobs.service import artifact_key
from app.storage import LocalStorage
from tests.app.conftest import Tenants
from tests.app.factories import npz_dataset, tiny_onnx_classifier
from tests.app.http import Response, assert_problem

if TYPE_CHECKING:
    from fastapi.routing import iter_route_contexts
else:
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI before 0.137 copies included routers' routes into app.routes.

        def iter_route_contexts(routes: Iterable[Any]) -> Iterator[Any]:
            """The routes as they are: nothing to expand."""
            return iter(routes)


#: Routes that belong to no tenant: the schema, the docs, health and metrics.
UNSCOPED = frozenset(
    {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/healthz", "/readyz", "/metrics"}
)

#: The artifact the walks aim at, and what its stored file holds.
ARTIFACT = "metrics.json"
ARTIFACT_BYTES = b'{"task": "classification"}'

# Phases of the owner's walk: reads see the job as submitted, then the cancel; the
# deletions come last since they remove what the other calls aim at.
READ, CANCEL, DELETE = range(3)

EVENT_STREAM = "text/event-stream"


@dataclass(frozen=True)
class Owned:
    """acme's resources: a teacher, a dataset, a queued job and one stored artifact of it."""

    model_id: str
    dataset_id: str
    job_id: str

    def path_params(self) -> dict[str, str]:
        """The values of every path parameter a route may name."""
        return {
            "model_id": self.model_id,
            "dataset_id": self.dataset_id,
            "job_id": self.job_id,
            "name": ARTIFACT,
        }


@dataclass(frozen=True)
class Walk:
    """What a check needs besides the response: the client, both tenants, acme's resources."""

    client: TestClient
    tenants: Tenants
    owned: Owned


Check = Callable[[Walk, Response], None]
OwnerCheck = Callable[[Response], None]


def _no_arguments(_owned: Owned) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Variant:
    """One way of calling a route: extra headers and request arguments, and the owner's answer.

    ``send`` gives the request's ``json``, ``files`` or ``params`` for acme's
    resources; ``phase`` orders the owner's walk.
    """

    owner: OwnerCheck
    label: str = "plain"
    headers: dict[str, str] = field(default_factory=dict)
    send: Callable[[Owned], dict[str, Any]] = _no_arguments
    phase: int = READ


@dataclass(frozen=True)
class RouteCase:
    """How the walks call one route: what another tenant must get, and the ways to call it."""

    stranger: Check
    variants: tuple[Variant, ...]


def answers(*statuses: int) -> OwnerCheck:
    """The owner's request succeeds with one of ``statuses``."""

    def check(response: Response) -> None:
        assert response.status_code in statuses, f"expected {statuses}"

    return check


def deleted_or_in_use(what: str) -> OwnerCheck:
    """The owner's delete succeeds, or is refused only because a queued job still uses the row.

    The owner's walk submits a second job of acme's that stays queued, so its
    inputs may be held; a 409 ``{what}_in_use`` still proves the route found the row.
    """

    def check(response: Response) -> None:
        if response.status_code != 204:
            assert_problem(response, 409, f"{what}_in_use")

    return check


def not_found(code: str) -> Check:
    """Another tenant's id is unknown: 404 with ``code``."""

    def check(_walk: Walk, response: Response) -> None:
        assert_problem(response, 404, code)

    return check


def listed_without_acme(collection: str) -> Check:
    """Another tenant's list answers 200 and holds none of acme's ``collection``."""

    def check(walk: Walk, response: Response) -> None:
        assert response.status_code == 200
        acme = {walk.owned.model_id, walk.owned.dataset_id, walk.owned.job_id}
        acme |= set(_ids(walk.client, f"/v1/{collection}", walk.tenants.acme))
        listed = {item["id"] for item in response.json()["data"]}
        assert not listed & acme, f"acme's {sorted(listed & acme)} listed for globex"

    return check


def uploaded_as_own(collection: str, what: str) -> Check:
    """Another tenant's upload creates its own row, which acme in turn cannot see."""

    def check(walk: Walk, response: Response) -> None:
        assert response.status_code == 201
        new = response.json()["id"]
        assert new not in {walk.owned.model_id, walk.owned.dataset_id}
        client, tenants = walk.client, walk.tenants
        assert client.get(f"/v1/{collection}/{new}", headers=tenants.globex).status_code == 200
        assert_problem(
            client.get(f"/v1/{collection}/{new}", headers=tenants.acme), 404, f"{what}_not_found"
        )

    return check


def submit_refused(_walk: Walk, response: Response) -> None:
    """A job on acme's inputs submitted by another tenant names an unknown teacher."""
    body = assert_problem(response, 422, "model_not_found")
    assert [e["field"] for e in body["errors"]] == ["body.teacher_model_id"]


def own_webhook_secret(walk: Walk, response: Response) -> None:
    """Another tenant's secret route (read or rotate) answers with its own secret, never acme's."""
    assert response.status_code == 200
    client, tenants = walk.client, walk.tenants
    acme = client.get("/v1/webhook-secret", headers=tenants.acme).json()["secret"]
    globex = client.get("/v1/webhook-secret", headers=tenants.globex).json()["secret"]
    assert response.json()["secret"] == globex != acme


def _ids(client: TestClient, path: str, headers: dict[str, str]) -> list[str]:
    """The ids on the first page of the list at ``path`` (each test holds only a few rows)."""
    response = client.get(path, headers=headers, params={"limit": 200})
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["data"]]


def _upload(filename: str, content: Callable[[], bytes]) -> Callable[[Owned], dict[str, Any]]:
    """Request arguments of a multipart upload of ``content`` as ``file``."""
    return lambda _owned: {"files": {"file": (filename, content())}}


def _spec(owned: Owned) -> dict[str, Any]:
    """A job spec on acme's teacher and dataset."""
    return {"json": {"teacher_model_id": owned.model_id, "dataset_id": owned.dataset_id}}


READS = (Variant(answers(200)),)
# Conditional and ranged requests are answered before the body is read: a 304 or
# 206 to a stranger would confirm that the id exists, so each must be a 404 too.
DOWNLOADS = (
    Variant(answers(200)),
    Variant(answers(206), "Range", {"Range": "bytes=0-0"}),
    Variant(answers(304), "If-None-Match", {"If-None-Match": "*"}),
)

#: Every tenant-scoped route of the app and how to call it; a route missing here fails the tests.
ROUTES: dict[tuple[str, str], RouteCase] = {
    ("POST", "/v1/models"): RouteCase(
        uploaded_as_own("models", "model"),
        (Variant(answers(201), send=_upload("t.onnx", tiny_onnx_classifier)),),
    ),
    ("GET", "/v1/models"): RouteCase(listed_without_acme("models"), READS),
    ("GET", "/v1/models/{model_id}"): RouteCase(not_found("model_not_found"), READS),
    ("GET", "/v1/models/{model_id}/content"): RouteCase(not_found("model_not_found"), DOWNLOADS),
    ("DELETE", "/v1/models/{model_id}"): RouteCase(
        not_found("model_not_found"), (Variant(deleted_or_in_use("model"), phase=DELETE),)
    ),
    ("POST", "/v1/datasets"): RouteCase(
        uploaded_as_own("datasets", "dataset"),
        (Variant(answers(201), send=_upload("d.npz", npz_dataset)),),
    ),
    ("GET", "/v1/datasets"): RouteCase(listed_without_acme("datasets"), READS),
    ("GET", "/v1/datasets/{dataset_id}"): RouteCase(not_found("dataset_not_found"), READS),
    ("GET", "/v1/datasets/{dataset_id}/content"): RouteCase(
        not_found("dataset_not_found"), DOWNLOADS
    ),
    ("DELETE", "/v1/datasets/{dataset_id}"): RouteCase(
        not_found("dataset_not_found"), (Variant(deleted_or_in_use("dataset"), phase=DELETE),)
    ),
    ("POST", "/v1/jobs"): RouteCase(submit_refused, (Variant(answers(202), send=_spec),)),
    ("GET", "/v1/jobs"): RouteCase(
        listed_without_acme("jobs"),
        (
            Variant(answers(200)),
            Variant(
                answers(200), "status=queued", send=lambda _owned: {"params": {"status": "queued"}}
            ),
        ),
    ),
    ("GET", "/v1/jobs/{job_id}"): RouteCase(not_found("job_not_found"), READS),
    ("POST", "/v1/jobs/{job_id}/cancel"): RouteCase(
        not_found("job_not_found"), (Variant(answers(202), phase=CANCEL),)
    ),
    ("GET", "/v1/jobs/{job_id}/events"): RouteCase(
        not_found("job_not_found"),
        (
            Variant(answers(200)),
            Variant(answers(200), "event stream", {"Accept": EVENT_STREAM}),
        ),
    ),
    ("GET", "/v1/jobs/{job_id}/artifacts"): RouteCase(not_found("job_not_found"), READS),
    ("GET", "/v1/jobs/{job_id}/artifacts/{name}"): RouteCase(not_found("job_not_found"), DOWNLOADS),
    # The secret is the caller's own: no id to aim at, so globex must get only its own.
    ("GET", "/v1/webhook-secret"): RouteCase(own_webhook_secret, READS),
    ("POST", "/v1/webhook-secret/rotate"): RouteCase(own_webhook_secret, (Variant(answers(200)),)),
}


def app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """Every ``(method, path template)`` the app serves, included routers expanded.

    Routes without methods (websockets, mounts) count as ``ANY`` so they cannot
    slip past the table unnoticed.
    """
    found: set[tuple[str, str]] = set()
    for route in iter_route_contexts(app.routes):
        assert route.path is not None, route
        if route.path in UNSCOPED:
            continue
        for method in route.methods or {"ANY"}:
            found.add((method, route.path))
    return found


def walked(app: FastAPI) -> list[tuple[str, str, RouteCase, Variant]]:
    """Each call of a walk over the app's routes, in the owner's phase order."""
    calls: list[tuple[str, str, RouteCase, Variant]] = []
    for method, path in sorted(app_routes(app)):
        case = ROUTES.get((method, path))
        if case is None:
            pytest.fail(f"{method} {path} has no entry in ROUTES: say how the walk calls it")
        calls += [(method, path, case, variant) for variant in case.variants]
    assert calls, "the walk found no routes: is the enumeration broken?"
    # sorted() is stable: within a phase the calls keep the routes' order.
    return sorted(calls, key=lambda c: c[3].phase)


def call(walk: Walk, method: str, path: str, variant: Variant, auth: dict[str, str]) -> Response:
    """``method`` on ``path`` filled with acme's ids, as ``variant`` says, with ``auth`` headers."""
    try:
        url = path.format_map(walk.owned.path_params())
    except KeyError as exc:
        pytest.fail(f"{method} {path}: the walk has no value for path parameter {exc}")
    headers = {**variant.headers, **auth}
    with walk.client.stream(method, url, headers=headers, **variant.send(walk.owned)) as response:
        if not response.headers.get("content-type", "").startswith(EVENT_STREAM):
            response.read()
            return response
        # The stream of an unfinished job never ends, and a leaked one must fail the walk,
        # not hang it: keep the first chunk, and leaving the block cancels the stream.
        first = next(response.iter_bytes(), b"")
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            content=first,
            # The TestClient speaks httpx2; httpx.Response only keeps the request for reference.
            request=response.request,  # type: ignore[arg-type]
        )


def failure(method: str, path: str, variant: Variant, response: Response, exc: Exception) -> str:
    """One failed call for the report: the route, what came back, and what was expected."""
    line = f"{method} {path} [{variant.label}]: {response.status_code} {response.text[:400]}"
    reason = str(exc)
    if reason and reason != response.text:
        line += f" -- {reason[:200]}"
    return line


@pytest.fixture
def owned(
    client: TestClient, tenants: Tenants, engine: sa.Engine, storage: LocalStorage, tmp_path: Path
) -> Owned:
    """acme's teacher, dataset, queued job, and a stored artifact recorded for that job."""
    model = client.post(
        "/v1/models", headers=tenants.acme, files={"file": ("t.onnx", tiny_onnx_classifier())}
    )
    dataset = client.post(
        "/v1/datasets", headers=tenants.acme, files={"file": ("d.npz", npz_dataset())}
    )
    assert model.status_code == dataset.status_code == 201, (model.text, dataset.text)
    spec = {"teacher_model_id": model.json()["id"], "dataset_id": dataset.json()["id"]}
    job = client.post("/v1/jobs", headers=tenants.acme, json=spec)
    assert job.status_code == 202, job.text

    # No worker runs here: the artifact is written as a worker would, file first, then its row.
    source = tmp_path / ARTIFACT
    source.write_bytes(ARTIFACT_BYTES)
    with Session(engine) as session, session.begin():
        row = session.get(Job, uuid.UUID(job.json()["id"]))
        assert row is not None
        stored = storage.put_file(artifact_key(row, ARTIFACT), source)
        session.add(
            JobArtifact(
                job_id=row.id,
                name=ARTIFACT,
                bytes=stored.size,
                sha256=stored.sha256,
                media_type="application/json",
                storage_key=stored.key,
            )
        )
    return Owned(model.json()["id"], dataset.json()["id"], job.json()["id"])


def acme_view(walk: Walk) -> dict[str, Any]:
    """Everything acme can read about its resources, to compare before and after globex's walk."""
    client, acme, owned = walk.client, walk.tenants.acme, walk.owned

    def read(path: str) -> Response:
        response = client.get(path, headers=acme)
        assert response.status_code == 200, f"{path}: {response.status_code} {response.text}"
        return response

    job = f"/v1/jobs/{owned.job_id}"
    return {
        "model": read(f"/v1/models/{owned.model_id}").json(),
        "model file": read(f"/v1/models/{owned.model_id}/content").content,
        "dataset": read(f"/v1/datasets/{owned.dataset_id}").json(),
        "dataset file": read(f"/v1/datasets/{owned.dataset_id}/content").content,
        "job": read(job).json(),
        "events": read(f"{job}/events").json(),
        "artifacts": read(f"{job}/artifacts").json(),
        "artifact file": read(f"{job}/artifacts/{ARTIFACT}").content,
        "models": _ids(client, "/v1/models", acme),
        "datasets": _ids(client, "/v1/datasets", acme),
        "jobs": _ids(client, "/v1/jobs", acme),
        "webhook secret": read("/v1/webhook-secret").json(),
    }


def test_every_route_has_an_entry_in_the_walk(client: TestClient) -> None:
    assert isinstance(client.app, FastAPI)
    routes = app_routes(client.app)
    missing = sorted(routes - ROUTES.keys())
    stale = sorted(ROUTES.keys() - routes)
    assert not missing, f"routes the isolation walk does not know how to call: {missing}"
    assert not stale, f"ROUTES entries for routes the app no longer serves: {stale}"


def test_another_tenants_ids_answer_404_on_every_route(
    client: TestClient, tenants: Tenants, owned: Owned, storage: LocalStorage, engine: sa.Engine
) -> None:
    walk = Walk(client, tenants, owned)
    before = acme_view(walk)
    failures = []
    assert isinstance(client.app, FastAPI)
    for method, path, case, variant in walked(client.app):
        response = call(walk, method, path, variant, tenants.globex)
        try:
            case.stranger(walk, response)
        except AssertionError as exc:
            failures.append(failure(method, path, variant, response, exc))
    assert not failures, "globex reached acme's resources:\n" + "\n".join(failures)

    after = acme_view(walk)
    assert after == before
    assert after["job"]["status"] == "queued", "globex's cancel changed acme's job"
    assert [a["name"] for a in after["artifacts"]["data"]] == [ARTIFACT]
    assert after["artifact file"] == ARTIFACT_BYTES
    assert after["model file"] == tiny_onnx_classifier()
    assert after["dataset file"] == npz_dataset()
    with Session(engine) as session:
        artifact = session.scalars(
            sa.select(JobArtifact).where(JobArtifact.job_id == uuid.UUID(owned.job_id))
        ).one()
    assert storage.path(artifact.storage_key).read_bytes() == ARTIFACT_BYTES


def test_the_owner_gets_the_same_requests_answered(
    client: TestClient, tenants: Tenants, owned: Owned
) -> None:
    walk = Walk(client, tenants, owned)
    failures = []
    assert isinstance(client.app, FastAPI)
    for method, path, _case, variant in walked(client.app):
        response = call(walk, method, path, variant, tenants.acme)
        try:
            variant.owner(response)
        except AssertionError as exc:
            failures.append(failure(method, path, variant, response, exc))
    assert not failures, "acme's own requests failed:\n" + "\n".join(failures)
    # The walk's cancel was acme's own, so it did take effect.
    job = client.get(f"/v1/jobs/{owned.job_id}", headers=tenants.acme).json()
    assert job["status"] == "cancelled"


@pytest.mark.parametrize(
    "auth",
    [{}, {"Authorization": "Bearer dk_unknown_secret"}, {"Authorization": "Basic YWNtZTo="}],
    ids=["no key", "unknown key", "not bearer"],
)
def test_every_route_needs_a_valid_key(
    client: TestClient, tenants: Tenants, owned: Owned, auth: dict[str, str]
) -> None:
    walk = Walk(client, tenants, owned)
    failures = []
    assert isinstance(client.app, FastAPI)
    for method, path, _case, variant in walked(client.app):
        assert path.startswith("/v1/")
        response = call(walk, method, path, variant, auth)
        try:
            assert_problem(response, 401, "unauthorized")
            assert response.headers["www-authenticate"].startswith("Bearer")
        except (AssertionError, KeyError) as exc:
            failures.append(failure(method, path, variant, response, exc))
    assert not failures, "answered without a valid key:\n" + "\n".join(failures)
