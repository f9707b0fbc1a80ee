"""Production packaging: docker-compose.yml and the Dockerfile run the project's real entry points.

Nothing here needs a Docker daemon: the compose file and the Dockerfile are read as data, and
each command a container would run is started here, from the repository root, with ``--help``
appended and the service's own ``DISTILL_*`` environment, so a typo in a module path, a
subcommand or an option fails here rather than in a crash-looping container.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
IMAGE = "distillery:latest"
TORCH_VERSION = "2.13.0"
SUBPROCESS_TIMEOUT_S = 120

REQUIRED_SERVICES = {
    "postgres",
    "redis",
    "migrate",
    "api",
    "worker",
    "beat",
    "control",
    "flower",
}
#: The queue of the control worker (the periodic tasks), which needs no GPU.
CONTROL_QUEUE = "distillery.control"

#: The project's entry points (DESIGN.md), as the argv prefix a container's command starts with.
ENTRY_POINTS: dict[str, tuple[str, ...]] = {
    "migrate": ("alembic", "upgrade", "head"),
    "api": ("uvicorn", "app.main:app"),
    "worker": ("celery", "-A", "worker.celery_app", "worker"),
    "beat": ("celery", "-A", "worker.celery_app", "beat"),
    "flower": ("celery", "-A", "worker.celery_app", "flower"),
}


# --- reading the files -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml, parsed once (YAML anchors and ``<<`` merges resolved)."""
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments) pairs."""
    return parse_dockerfile(DOCKERFILE.read_text())


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """Instructions of a Dockerfile, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        # Docker drops comment lines even inside a continued instruction.
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, rest = (current + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued instruction"
    return instructions


def instruction_args(rest: str) -> list[str]:
    """An instruction's arguments, in exec (JSON array) or shell form."""
    if rest.startswith("["):
        args: list[str] = json.loads(rest)
        return args
    return shlex.split(rest)


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The compose file's services by name."""
    found: dict[str, dict[str, Any]] = compose.get("services") or {}
    return found


def project_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the project's image."""
    return {name: s for name, s in services(compose).items() if s.get("image") == IMAGE}


def command_of(service: dict[str, Any]) -> list[str]:
    """A service's command as argv (compose splits a string command like a shell, unrun)."""
    command = service.get("command")
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, from either the mapping or the ``KEY=VALUE`` list form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def mounts_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's volume mounts as {container path: source}, short or long syntax."""
    mounts: dict[str, str] = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        mounts[target] = source
    return mounts


def entry_point_of(argv: list[str]) -> str | None:
    """The name of the entry point ``argv`` runs, or None when it runs none of them."""
    for name, prefix in ENTRY_POINTS.items():
        if tuple(argv[: len(prefix)]) == prefix:
            return name
    return None


def services_running(compose: dict[str, Any], entry_point: str) -> dict[str, dict[str, Any]]:
    """The project services whose command is ``entry_point`` (``worker``: the job workers,
    not the control worker that only consumes the control queue)."""
    return {
        name: s
        for name, s in project_services(compose).items()
        if entry_point_of(command_of(s)) == entry_point
        and not (entry_point == "worker" and is_control_worker(s))
    }


def is_control_worker(service: dict[str, Any]) -> bool:
    """Whether the service is a Celery worker consuming only the control queue."""
    argv = command_of(service)
    return "--queues" in argv and argv[argv.index("--queues") + 1] == CONTROL_QUEUE


def volume_holding(service: dict[str, Any], path: str) -> tuple[str, str] | None:
    """The (target, source) of the mount that ``path`` lies on in ``service``, if any."""
    for target, source in mounts_of(service).items():
        if PurePosixPath(path).is_relative_to(PurePosixPath(target)):
            return target, source
    return None


def storage_path(env: dict[str, str]) -> str:
    """The folder of a service's ``file://`` DISTILL_STORAGE_URL."""
    parsed = urlparse(env["DISTILL_STORAGE_URL"])
    assert parsed.scheme == "file", f"storage is not file://: {env['DISTILL_STORAGE_URL']}"
    return parsed.netloc + parsed.path


# --- running the entry points ----------------------------------------------------------------


def subprocess_env(service: dict[str, Any], root: Path) -> dict[str, str]:
    """This process's environment with the service's ``DISTILL_*`` settings in place.

    The database and broker URLs are kept as they are (nothing here connects to them, but the
    database driver and broker transport they name must load); the container paths under
    ``/data`` are re-rooted under ``root`` so that nothing is written outside the test's folder.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    env.update(environment_of(service))
    if "DISTILL_STORAGE_URL" in env:
        env["DISTILL_STORAGE_URL"] = f"file://{root}{storage_path(env)}"
    if "DISTILL_WORK_DIR" in env:
        env["DISTILL_WORK_DIR"] = f"{root}{env['DISTILL_WORK_DIR']}"
    return env


def run_python(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run this interpreter with ``args`` from the repository root, as a container would."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


def assert_ran(result: subprocess.CompletedProcess[str], what: str) -> None:
    """Fail with the command's output when it did not exit 0."""
    assert result.returncode == 0, (
        f"{what} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


# --- docker-compose.yml ----------------------------------------------------------------------


def test_required_services_exist(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "the top-level `version` key is obsolete in compose"
    missing = REQUIRED_SERVICES - set(services(compose))
    assert not missing, f"services missing from docker-compose.yml: {sorted(missing)}"


def test_project_services_build_one_image(compose: dict[str, Any]) -> None:
    every = services(compose)
    for name in ENTRY_POINTS:
        assert every[name].get("image") == IMAGE, f"{name} does not run {IMAGE}"
    for name, service in every.items():
        if "build" not in service:
            continue
        # Sharing one image name makes compose build the image once for all of them.
        assert service.get("image") == IMAGE, f"{name} builds an image other than {IMAGE}"
        build = service["build"]
        context = build if isinstance(build, str) else build.get("context")
        assert context == ".", f"{name} builds from {context!r}, not the repository root"


def test_every_project_service_runs_an_entry_point(compose: dict[str, Any]) -> None:
    for name, service in project_services(compose).items():
        argv = command_of(service)
        entry_point = entry_point_of(argv)
        assert entry_point is not None, f"{name} runs {argv}, none of the project's entry points"
        # The program must be a console script the project's install puts beside python.
        assert (Path(sys.executable).parent / argv[0]).exists(), f"{argv[0]} is not installed"
    for entry_point in ENTRY_POINTS:
        # Each required service runs the entry point named after it (worker-gpuN run `worker`).
        assert entry_point_of(command_of(services(compose)[entry_point])) == entry_point


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_entry_point_command_is_real(
    compose: dict[str, Any], entry_point: str, tmp_path: Path
) -> None:
    running = services_running(compose, entry_point)
    assert running, f"no service runs the {entry_point} entry point"
    distinct = {shlex.join(command_of(s)): (name, s) for name, s in running.items()}
    for command, (name, service) in distinct.items():
        # Click and argparse reject an unknown subcommand or option before handling --help,
        # and `celery -A` imports the Celery app first: a broken command exits non-zero.
        argv = [*command_of(service), "--help"]
        result = run_python(["-m", *argv], subprocess_env(service, tmp_path))
        assert_ran(result, f"{name}: `{command} --help`")


def test_api_serves_the_fastapi_app_with_healthz(compose: dict[str, Any], tmp_path: Path) -> None:
    probe = (
        "import json, fastapi, app.main as m; "
        "assert isinstance(m.app, fastapi.FastAPI), type(m.app); "
        "print(json.dumps([getattr(r, 'path', '') for r in m.app.routes]))"
    )
    env = subprocess_env(services(compose)["api"], tmp_path)
    result = run_python(["-c", probe], env)
    assert_ran(result, "importing app.main with the api service's environment")
    paths = json.loads(result.stdout.strip().splitlines()[-1])
    # The image's HEALTHCHECK probes this route.
    assert "/healthz" in paths


def test_migrate_upgrades_to_a_single_head(compose: dict[str, Any], tmp_path: Path) -> None:
    assert (ROOT / "alembic.ini").is_file()
    # `alembic heads` reads the migration scripts only: it connects to no database.
    result = run_python(
        ["-m", "alembic", "heads"], subprocess_env(services(compose)["migrate"], tmp_path)
    )
    assert_ran(result, "alembic heads")
    heads = [line for line in result.stdout.splitlines() if line.strip()]
    # Two heads would make `alembic upgrade head` fail ("Multiple head revisions").
    assert len(heads) == 1 and heads[0].endswith("(head)"), result.stdout


def test_worker_registers_the_project_tasks(compose: dict[str, Any], tmp_path: Path) -> None:
    # `worker --help` imports the Celery app but not its `include` modules; a worker does.
    probe = (
        "import json; from worker.celery_app import app; "
        "app.loader.import_default_modules(); "
        "print(json.dumps(sorted(t for t in app.tasks if not t.startswith('celery.'))))"
    )
    result = run_python(["-c", probe], subprocess_env(services(compose)["worker"], tmp_path))
    assert_ran(result, "loading the worker's tasks")
    tasks = json.loads(result.stdout.strip().splitlines()[-1])
    assert tasks, "the worker registers none of the project's tasks"


def test_flower_options_and_healthcheck(compose: dict[str, Any], tmp_path: Path) -> None:
    flower = services(compose)["flower"]
    options = command_of(flower)[len(ENTRY_POINTS["flower"]) :]
    # Flower hands its options to tornado unparsed, so `--help` accepts any: parse them the
    # way flower does, where an unknown one raises. Its compose healthcheck needs the route.
    probe = (
        "import sys, flower.options; from flower.urls import handlers; "
        "from tornado.options import options; "
        "options.parse_command_line(['flower', *sys.argv[1:]], final=False); "
        "routes = [h[0] if isinstance(h, tuple) else h.regex.pattern for h in handlers]; "
        "assert '/healthcheck' in [r.rstrip('$') for r in routes], routes; print(options.port)"
    )
    result = run_python(["-c", probe, *options], subprocess_env(flower, tmp_path))
    assert_ran(result, f"flower options {options}")
    port = result.stdout.strip().splitlines()[-1]
    assert f"127.0.0.1:{port}/healthcheck" in " ".join(flower["healthcheck"]["test"])
    assert any(str(p).endswith(f":{port}") for p in flower.get("ports", []))


def test_workers_reserve_one_nvidia_gpu_each(compose: dict[str, Any]) -> None:
    workers = services_running(compose, "worker")
    claimed: dict[str, str] = {}
    for name, service in workers.items():
        devices = (
            service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        )
        assert devices, f"{name} reserves no device"
        gpus = [
            d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
        ]
        assert len(gpus) == 1, f"{name} must reserve exactly one nvidia gpu entry: {devices}"
        ids = [str(i) for i in gpus[0].get("device_ids", [])]
        # One worker per GPU: each pins its own device, and no two pin the same one.
        assert len(ids) == 1, f"{name} reserves {ids or gpus[0]}, not one pinned GPU"
        assert ids[0] not in claimed, f"{name} and {claimed.get(ids[0])} both pin GPU {ids[0]}"
        claimed[ids[0]] = name
        assert environment_of(service).get("DISTILL_DEVICE") == "cuda", name
    assert claimed.get("0") == "worker"


def test_api_and_workers_share_the_storage_volume(compose: dict[str, Any]) -> None:
    every = services(compose)
    api_env = environment_of(every["api"])
    path = storage_path(api_env)
    api_volume = volume_holding(every["api"], path)
    assert api_volume is not None, f"the api's storage {path} is on no volume"
    named_volumes = set(compose.get("volumes") or {})
    assert api_volume[1] in named_volumes, f"{api_volume[1]} is not a named volume"
    for name, service in services_running(compose, "worker").items():
        env = environment_of(service)
        # Workers read the uploads the API stored and write artifacts the API serves.
        assert env["DISTILL_STORAGE_URL"] == api_env["DISTILL_STORAGE_URL"], name
        assert volume_holding(service, path) == api_volume, f"{name} does not mount {api_volume}"
        assert volume_holding(service, env["DISTILL_WORK_DIR"]) is not None, name
    beat = command_of(every["beat"])
    schedule = beat[beat.index("--schedule") + 1]
    # Beat's schedule survives a restart only on a volume.
    assert volume_holding(every["beat"], schedule) == api_volume


def test_dependencies_wait_for_what_they_need(compose: dict[str, Any]) -> None:
    every = services(compose)
    conditions = {
        name: {dep: spec.get("condition") for dep, spec in (s.get("depends_on") or {}).items()}
        for name, s in every.items()
        if isinstance(s.get("depends_on"), dict)
    }
    assert conditions["migrate"].get("postgres") == "service_healthy"
    for name in ("api", "worker", "beat"):
        assert conditions[name].get("migrate") == "service_completed_successfully", name
        assert conditions[name].get("redis") == "service_healthy", name
    for name, deps in conditions.items():
        for dep, condition in deps.items():
            if condition == "service_healthy":
                check = every[dep].get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), (
                    f"{name} waits for {dep} to be healthy, which has no healthcheck"
                )


def test_only_the_api_keeps_the_image_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in project_services(compose).items():
        if entry_point_of(command_of(service)) == "api":
            assert "healthcheck" not in service or service["healthcheck"].get("test"), name
            continue
        # The image's HEALTHCHECK probes the API's port: any other process would be unhealthy.
        check = service.get("healthcheck")
        assert check and (check.get("disable") or check.get("test")), (
            f"{name} inherits the image's API healthcheck"
        )


def test_distill_variables_are_settings_fields(
    compose: dict[str, Any], dockerfile: list[tuple[str, str]]
) -> None:
    fields = set(Settings.model_fields)
    seen: set[str] = set()
    for name, service in services(compose).items():
        # Values are strings, as in the environment; Settings validates and converts them.
        settings: dict[str, Any] = {
            key.removeprefix("DISTILL_").lower(): value
            for key, value in environment_of(service).items()
            if key.startswith("DISTILL_")
        }
        unknown = set(settings) - fields
        assert not unknown, f"{name} sets DISTILL_* variables Settings ignores: {sorted(unknown)}"
        # The values must validate too (DISTILL_DEVICE is one of auto, cpu, cuda, ...).
        Settings(**settings)
        seen |= set(settings)
    assert {"database_url", "broker_url", "storage_url"} <= seen
    for keyword, rest in dockerfile:
        if keyword != "ENV":
            continue
        for assignment in instruction_args(rest):
            key = assignment.partition("=")[0]
            if key.startswith("DISTILL_"):
                assert key.removeprefix("DISTILL_").lower() in fields, f"Dockerfile ENV {key}"


def test_docker_compose_config_is_valid() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on PATH")
    probe = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=60, check=False
    )
    if probe.returncode != 0:
        said = (probe.stderr or probe.stdout).strip().splitlines()
        pytest.skip(
            "the docker client has no compose plugin (`docker compose version`: "
            f"{said[0] if said else probe.returncode})"
        )
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )
    assert_ran(result, "docker compose config -q")


# --- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_installs_cuda_torch_and_the_extras(dockerfile: list[tuple[str, str]]) -> None:
    assert dockerfile[0] == ("FROM", "python:3.11-slim")
    runs = [rest for keyword, rest in dockerfile if keyword == "RUN"]
    engine = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert f"torch=={TORCH_VERSION}" in engine["engine"], "pyproject.toml pins another torch"
    # The image takes torch from PyPI, whose default linux x86_64 wheel is the CUDA build.
    assert any(re.search(rf"pip install .*\btorch=={re.escape(TORCH_VERSION)}\b", r) for r in runs)
    extras = [
        set(match.group(1).split(","))
        for r in runs
        if (match := re.search(r"pip install .*'?\.\[([a-z,]+)\]'?", r))
    ]
    assert any({"engine", "service"} <= found for found in extras), runs
    # Flower is a celery subcommand only once its package is installed with the service.
    assert any(dep.startswith("flower") for dep in engine["service"])


def test_dockerfile_runs_the_api_as_a_non_root_user(dockerfile: list[tuple[str, str]]) -> None:
    last = {keyword: rest for keyword, rest in dockerfile}
    assert last["WORKDIR"] == "/srv/distillery"
    assert last["USER"] not in ("root", "0")
    assert [k for k, _ in dockerfile].index("USER") > max(
        i for i, (k, _) in enumerate(dockerfile) if k == "RUN"
    ), "RUN instructions after USER would need root"
    assert "8000" in last["EXPOSE"].split()
    assert "PYTHONUNBUFFERED=1" in instruction_args(
        next(rest for k, rest in dockerfile if k == "ENV" and "PYTHONUNBUFFERED" in rest)
    )
    assert "http://127.0.0.1:8000/healthz" in last["HEALTHCHECK"]
    assert "urllib" in last["HEALTHCHECK"]
    assert tuple(instruction_args(last["CMD"])[:2]) == ENTRY_POINTS["api"]


def test_dockerfile_copies_paths_that_exist(dockerfile: list[tuple[str, str]]) -> None:
    ignored = [
        line.strip().lstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    ]
    copied: list[str] = []
    for keyword, rest in dockerfile:
        if keyword not in ("COPY", "ADD"):
            continue
        args = [a for a in instruction_args(rest) if not a.startswith("--")]
        assert not rest.startswith("--from"), "a multi-stage COPY needs its own check"
        for source in args[:-1]:
            assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is missing"
            hidden = [
                p for p in ignored if fnmatch.fnmatch(source, p) or source.startswith(p + "/")
            ]
            assert not hidden, f".dockerignore excludes {source} ({hidden})"
            copied.append(source.rstrip("/"))
    # Everything a container runs: the package, its metadata, and the migrations.
    needed = ["pyproject.toml", "README.md", "alembic.ini", "migrations", "app", "worker"]
    assert set(needed) <= set(copied), f"not copied: {sorted(set(needed) - set(copied))}"
    # The metadata comes first, so a code change does not reinstall the dependencies.
    assert copied.index("pyproject.toml") < copied.index("app")


def test_the_control_worker_takes_what_beat_schedules(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    control = services(compose)["control"]
    assert is_control_worker(control)
    assert "deploy" not in control, "the control worker needs no GPU"
    argv = command_of(control)
    assert argv[argv.index("--pool") + 1] == "threads"
    # Every periodic task is routed to the control queue, never behind a training job.
    probe = (
        "from worker.celery_app import app; "
        "routes = app.conf.task_routes; "
        "print(sorted({routes[e['task']]['queue'] for e in app.conf.beat_schedule.values()}))"
    )
    result = run_python(["-c", probe], subprocess_env(control, tmp_path))
    assert_ran(result, "beat schedule routes")
    assert result.stdout.strip().splitlines()[-1] == str([CONTROL_QUEUE])
