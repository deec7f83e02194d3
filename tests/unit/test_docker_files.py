"""The Docker deployment files, checked without a Docker engine.

`docker-compose config` must resolve docker/compose.yaml (install it with
tests/ensure_docker_compose.sh); the Dockerfile and the Prometheus files are read as text and
YAML. No image is built and no container started here: this machine has no Docker engine.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.promtool import alert_rules, promtool, run_rule_tests
from tests.system.test_packaging import WHEEL_SOURCES  # what the image's wheel is built from

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ALERTS_FILE = DOCKER / "prometheus-alerts.yml"
PROMETHEUS_FILE = DOCKER / "prometheus.yml"
FLOWER_AUTH = "admin:test-secret"
RUNTIME_LOCK = REPO / "requirements.lock"
TEST_LOCK = REPO / "requirements-test.lock"

APP_SERVICES = {"migrate", "worker", "beat", "flower", "metrics", "fake-microservice"}
ALL_SERVICES = APP_SERVICES | {"postgres", "redis", "prometheus"}
DATABASE_READERS = {"worker", "beat", "metrics"}
DEFAULT_ENV = {
    "STOCK_SYNC_DATABASE_URL": "postgresql://stock_sync:stock_sync@postgres:5432/stock_sync",
    "STOCK_SYNC_BROKER_URL": "redis://redis:6379/0",
    "STOCK_SYNC_MICROSERVICE_URL": "http://fake-microservice:8765",
    "STOCK_SYNC_LOG_LEVEL": "INFO",
    "STOCK_SYNC_ALERT_WEBHOOK_URL": "",
}
COMMANDS = {
    "migrate": "stock-sync db upgrade",
    "worker": "celery -A tasks worker --loglevel=INFO",
    "beat": "celery -A tasks beat --loglevel=INFO",
    "flower": "stock-sync flower --address 0.0.0.0 --port 5555",
    "metrics": "stock-sync metrics-server --host 0.0.0.0 --port 9808",
    "fake-microservice": "stock-sync fake-microservice --host 0.0.0.0 --port 8765",
}
LAST_SUCCESS = "stock_sync_maintenance_last_success_timestamp_seconds"
# alert name -> (metric, comparison, threshold, for)
ALERTS = {
    # alert: (a metric its expression reads, comparison, threshold, for)
    "StockSyncStuckOperations": ("stock_sync_stuck_operations", ">=", 1.0, "5m"),
    "StockSyncHighErrorRate": ("stock_sync_order_deductions_settled_total", ">=", 0.2, "10m"),
    "StockSyncSlowProcessing": ("stock_sync_processing_seconds_bucket", ">", 300.0, "10m"),
    "StockSyncFrequentCancellations": ("stock_sync_cancellations_total", ">=", 0.1, "30m"),
    "StockSyncFailedRollbacks": ("stock_sync_failed_rollbacks", ">=", 1.0, "1m"),
    "StockSyncMarketplaceDrift": ("stock_sync_marketplace_drift", ">=", 1.0, "0m"),
    "StockSyncMetricsDatabaseDown": ("stock_sync_database_up", "==", 0.0, "5m"),
    "StockSyncBrokerDown": ("stock_sync_broker_up", "==", 0.0, "5m"),
    "StockSyncMicroserviceDown": ("stock_sync_microservice_up", "==", 0.0, "5m"),
    "StockSyncBeatDown": (LAST_SUCCESS, ">", 300.0, "2m"),
    "StockSyncMaintenanceStale": (LAST_SUCCESS, ">", 600.0, "5m"),
    "StockSyncReconciliationStale": (LAST_SUCCESS, ">", 93600.0, "1h"),
}


def docker_compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.fail(
            "docker-compose is not installed: run `bash tests/ensure_docker_compose.sh` "
            "(installs Debian's docker-compose package) and re-run the tests",
            pytrace=False,
        )
    return path


def compose_env(**overrides: str) -> dict[str, str]:
    """The caller's environment without settings that would change the resolved file."""
    prefixes = ("STOCK_SYNC_", "FLOWER_", "COMPOSE_", "DOCKER_", "POSTGRES_", "OTEL_", "SENTRY_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["FLOWER_BASIC_AUTH"] = FLOWER_AUTH
    env.update(overrides)
    return env


@pytest.fixture(scope="module")
def run_config(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    """Runs `docker-compose config` from the repo root; an empty --env-file keeps a local
    docker/.env out of the result."""
    env_file = tmp_path_factory.mktemp("compose") / "empty.env"
    env_file.write_text("")
    executable = docker_compose()

    def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        argv = [executable, "--env-file", str(env_file), "-f", "docker/compose.yaml", "config"]
        return subprocess.run(
            argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
        )

    return run


def resolved(run_config: Callable[..., Any], **overrides: str) -> dict[str, Any]:
    result = run_config(compose_env(**overrides))
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


@pytest.fixture(scope="module")
def config(run_config: Callable[..., Any]) -> dict[str, Any]:
    return resolved(run_config)


@pytest.fixture(scope="module")
def services(config: dict[str, Any]) -> dict[str, Any]:
    services: dict[str, Any] = config["services"]
    return services


def command_of(service: dict[str, Any]) -> str:
    command = service["command"]
    return command if isinstance(command, str) else shlex.join(command)


def healthcheck_of(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def dockerfile_values(instruction: str) -> list[str]:
    return [args for name, args in dockerfile_instructions() if name == instruction]


def has_patch_version(image: str, parts: int = 3) -> bool:
    """True for name:MAJOR.MINOR.PATCH[-variant] (a 'v' prefix allowed), never 'latest'.

    PostgreSQL numbers its bug-fix releases MAJOR.MINOR (16.9): pass parts=2 for it.
    """
    name, _, tag = image.rpartition(":")
    version = r"\.".join([r"\d+"] * parts)
    return bool(name) and "latest" not in tag and re.match(rf"v?{version}(-|$)", tag) is not None


# --- docker/compose.yaml ------------------------------------------------------------------


def test_docker_compose_resolves_the_file_with_every_service(services: dict[str, Any]) -> None:
    assert set(services) == ALL_SERVICES


def test_every_stock_sync_process_runs_the_image_built_from_the_repo_root(
    services: dict[str, Any],
) -> None:
    images = {services[name]["image"] for name in APP_SERVICES}
    assert len(images) == 1
    for name in APP_SERVICES:
        build = services[name]["build"]
        assert Path(build["context"]) == REPO, name
        assert build["dockerfile"] == "docker/Dockerfile", name


def test_each_service_runs_its_process(services: dict[str, Any]) -> None:
    for name, command in COMMANDS.items():
        assert command_of(services[name]).startswith(command), name


def test_third_party_images_are_pinned_to_a_patch_release(services: dict[str, Any]) -> None:
    images = {name: services[name]["image"] for name in ALL_SERVICES - APP_SERVICES}
    assert images["postgres"].startswith("postgres:16.")
    assert images["redis"].startswith("redis:7.")
    assert images["prometheus"].startswith("prom/prometheus:v")
    for name, image in images.items():
        parts = 2 if name == "postgres" else 3
        assert has_patch_version(image, parts), f"{name}: {image} is not pinned to a patch release"


def test_migrations_run_once_after_postgres_and_before_every_database_reader(
    services: dict[str, Any],
) -> None:
    migrate = services["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"
    for name in DATABASE_READERS:
        depends_on = services[name]["depends_on"]
        assert depends_on["migrate"]["condition"] == "service_completed_successfully", name
        assert depends_on["redis"]["condition"] == "service_healthy", name


def test_the_long_running_services_have_healthchecks(services: dict[str, Any]) -> None:
    assert "pg_isready" in healthcheck_of(services["postgres"])
    assert "redis-cli ping" in healthcheck_of(services["redis"])
    # the worker by its heartbeat file, beat by its own sends: neither needs the broker to answer
    assert healthcheck_of(services["worker"]) == "CMD stock-sync health --only worker"
    assert "http://127.0.0.1:9808/readyz" in healthcheck_of(services["metrics"])
    assert healthcheck_of(services["beat"]) == "CMD stock-sync health --only beat"
    assert "http://127.0.0.1:8765/_admin/health" in healthcheck_of(services["fake-microservice"])
    assert "/healthcheck" in healthcheck_of(services["flower"])


def assert_every_app_service_has(services: dict[str, Any], variables: dict[str, str]) -> None:
    """Each application service's resolved environment holds ``variables``, with their values."""
    for name in APP_SERVICES:
        environment = services[name]["environment"]
        assert {k: environment.get(k) for k in variables} == variables, name


def test_every_process_gets_the_shared_environment_with_its_defaults(
    services: dict[str, Any],
) -> None:
    assert_every_app_service_has(services, DEFAULT_ENV)


def test_an_operator_overrides_the_environment_from_the_shell(
    run_config: Callable[..., Any],
) -> None:
    overrides = {
        "STOCK_SYNC_BROKER_URL": "redis://broker.internal:6379/3",
        "STOCK_SYNC_LOG_LEVEL": "DEBUG",
        "STOCK_SYNC_ALERT_WEBHOOK_URL": "https://hooks.example.com/stock-sync",
    }
    assert_every_app_service_has(resolved(run_config, **overrides)["services"], overrides)


def test_tracing_and_sentry_variables_reach_every_process_only_when_set(
    run_config: Callable[..., Any],
) -> None:
    observability = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        "SENTRY_DSN": "https://key@sentry.example.com/7",
        "STOCK_SYNC_SENTRY_CRONS": "1",
    }
    unset = resolved(run_config)["services"]
    assert_every_app_service_has(resolved(run_config, **observability)["services"], observability)
    for name in APP_SERVICES:
        # unset in the shell: no value at all (an empty OTEL endpoint would be a broken one)
        assert unset[name]["environment"].get("OTEL_EXPORTER_OTLP_ENDPOINT") is None, name
        assert unset[name]["environment"]["STOCK_SYNC_SENTRY_CRONS"] == "0", name


def test_flower_refuses_to_start_without_basic_auth(
    run_config: Callable[..., Any], services: dict[str, Any]
) -> None:
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == FLOWER_AUTH
    env = compose_env()
    del env["FLOWER_BASIC_AUTH"]
    result = run_config(env)
    assert result.returncode != 0
    assert "FLOWER_BASIC_AUTH" in result.stderr


def test_flower_and_metrics_publish_their_ports(services: dict[str, Any]) -> None:
    def published(name: str) -> set[int]:
        ports = set()
        for port in services[name]["ports"]:
            text = str(port["target"] if isinstance(port, dict) else port)
            ports.add(int(text.split("/")[0].rsplit(":", 1)[-1]))
        return ports

    assert published("flower") == {5555}
    assert published("metrics") == {9808}


def test_there_is_exactly_one_beat(services: dict[str, Any]) -> None:
    assert services["beat"].get("deploy", {}).get("replicas", 1) == 1
    assert "/app/data/" in command_of(services["beat"])  # the non-root user's writable folder


def test_prometheus_loads_the_scrape_config_and_the_alert_rules(
    services: dict[str, Any],
) -> None:
    mounts = {}
    for volume in services["prometheus"]["volumes"]:
        source, target = (
            (volume["source"], volume["target"])
            if isinstance(volume, dict)
            else volume.split(":")[:2]
        )
        mounts[target] = source
    assert Path(mounts["/etc/prometheus/prometheus.yml"]) == PROMETHEUS_FILE
    assert Path(mounts["/etc/prometheus/prometheus-alerts.yml"]) == ALERTS_FILE


def test_ensure_script_succeeds_at_once_when_docker_compose_is_installed() -> None:
    docker_compose()
    result = subprocess.run(
        ["bash", str(REPO / "tests" / "ensure_docker_compose.sh")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


# --- docker/Dockerfile --------------------------------------------------------------------


def test_the_base_image_is_python_3_11_slim_pinned_to_a_patch_release() -> None:
    bases = [args.split()[0] for args in dockerfile_values("FROM")]
    assert bases, "no FROM"
    for base in bases:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base
        assert has_patch_version(base), base


def test_the_processes_run_as_a_non_root_user() -> None:
    users = dockerfile_values("USER")
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    instructions = [name for name, _ in dockerfile_instructions()]
    last_user = len(instructions) - 1 - instructions[::-1].index("USER")
    assert "RUN" not in instructions[last_user:], "a RUN after USER would need root"


def test_the_image_installs_the_locked_dependencies_then_the_wheel_without_extras() -> None:
    assert dockerfile_values("WORKDIR")[-1] == "/app"
    env = " ".join(dockerfile_values("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PYTHONUNBUFFERED=1" in env
    copied = {src.rstrip("/") for args in dockerfile_values("COPY") for src in args.split()[:-1]}
    for needed in (*WHEEL_SOURCES, "requirements.lock"):
        assert needed in copied, needed
    runs = dockerfile_values("RUN")
    (lock_step,) = [
        i
        for i, run in enumerate(runs)
        if "pip install --require-hashes -r /tmp/requirements.lock" in run
    ]
    (package_step,) = [i for i, run in enumerate(runs) if "pip install --no-deps" in run]
    # the pinned set first, then the wheel alone, checked against it
    assert lock_step < package_step
    assert "/tmp/wheels/*.whl" in runs[package_step] and "pip check" in runs[package_step]
    assert any("pip wheel --no-deps" in run for run in runs)
    everything = " ".join(runs)
    assert "pip install -e" not in everything  # the wheel carries the migrations now
    assert "[test]" not in everything
    assert "[dev]" not in everything


def test_the_default_command_is_the_worker() -> None:
    assert dockerfile_values("CMD") == ['["celery", "-A", "tasks", "worker", "--loglevel=INFO"]']


def test_dockerignore_keeps_local_state_out_but_lets_the_sources_in() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    ignored = [p for p in patterns if not p.startswith("!")]
    for local in (".git", ".venv", "data", ".env"):
        assert local in ignored, local
    for source in (*WHEEL_SOURCES, "requirements.lock"):
        assert (REPO / source).exists(), source
        assert not any(fnmatch(source, pattern) for pattern in ignored), source


# --- requirements.lock (the image) and requirements-test.lock (make install) -----------------


def pyproject_requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    texts = project["dependencies"] + [
        text for extra in extras for text in project["optional-dependencies"][extra]
    ]
    return [Requirement(text) for text in texts]


# The extras the image carries (tracing and error reporting, off until configured): the runtime
# lock resolves them with the dependencies; the test lock adds the [test] extra.
IMAGE_EXTRAS = ("otel", "sentry")
_PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
_HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def locked_requirements(path: Path) -> dict[str, tuple[Version, list[str]]]:
    """NAME==VERSION with its ``--hash=sha256:...`` options (pip's --require-hashes format,
    continuation lines joined), comments aside: exact pins only, nothing left to resolve."""
    text = re.sub(r"\\\n", " ", path.read_text())
    locked: dict[str, tuple[Version, list[str]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        requirement, *options = line.split()
        match = _PIN.fullmatch(requirement)
        assert match, f"{path.name}: not an exact pin: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in locked, f"{path.name}: {name} pinned twice"
        assert all(_HASH.fullmatch(option) for option in options), f"{path.name}: {line!r}"
        locked[name] = (Version(match.group(2)), options)
    return locked


def locked_pins(path: Path) -> dict[str, Version]:
    return {name: version for name, (version, _) in locked_requirements(path).items()}


@pytest.mark.parametrize(
    ("lock", "extras"),
    [(RUNTIME_LOCK, IMAGE_EXTRAS), (TEST_LOCK, (*IMAGE_EXTRAS, "test"))],
    ids=["runtime", "test"],
)
def test_every_dependency_is_pinned_within_pyprojects_range(
    lock: Path, extras: tuple[str, ...]
) -> None:
    pins = locked_pins(lock)
    stale = []
    for requirement in pyproject_requirements(*extras):
        name = canonicalize_name(requirement.name)
        if name not in pins or not requirement.specifier.contains(pins[name], prereleases=True):
            stale.append(f"{requirement} (locked: {pins.get(name, 'nothing')})")
        elif requirement.extras:  # celery[redis]: the extra's own dependency is locked too
            assert all(canonicalize_name(extra) in pins for extra in requirement.extras), name
    assert not stale, f"{lock.name} is stale, run `make lock`: {stale}"
    assert "stock-sync" not in pins  # the project itself is installed from its wheel


@pytest.mark.parametrize("lock", [RUNTIME_LOCK, TEST_LOCK], ids=["runtime", "test"])
def test_every_pin_carries_the_hashes_pip_checks(lock: Path) -> None:
    """pip's --require-hashes refuses a lock with one pin lacking a hash: every pin has one
    sha256 per published file (make lock asks uv for all of them)."""
    missing = [name for name, (_, hashes) in locked_requirements(lock).items() if not hashes]
    assert not missing, f"{lock.name}: pins without hashes, run `make lock`: {missing}"


def test_the_test_lock_pins_the_images_versions() -> None:
    """make install (the tests, CI) uses the same versions as the image, plus test tools."""
    runtime, test = locked_requirements(RUNTIME_LOCK), locked_requirements(TEST_LOCK)
    assert {name: test.get(name) for name in runtime} == runtime  # the same hashes too
    assert not {"pytest", "pytest-celery", "mypy", "ruff"} & set(runtime), "test tools in the image"


def test_make_install_installs_the_test_lock_with_hashes_then_the_project_alone() -> None:
    makefile = (REPO / "Makefile").read_text()
    locked = makefile.index("pip install --quiet --require-hashes -r requirements-test.lock")
    project = makefile.index("pip install --quiet --no-deps -e .")
    assert locked < project
    assert re.search(r"^\$\(STAMP\):.*requirements-test\.lock", makefile, re.MULTILINE)


def test_make_lock_generates_hashes_for_both_locks_with_the_image_extras() -> None:
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile[makefile.index("\nlock:") :].split("\n\n", 1)[0]
    assert "--generate-hashes" in recipe
    assert "-o requirements.lock" in recipe and "-o requirements-test.lock" in recipe
    assert "--extra test -c requirements.lock" in recipe
    image_extras = re.search(r"^IMAGE_EXTRAS := (.*)$", makefile, re.MULTILINE)
    assert image_extras and image_extras.group(1).split() == [
        word for extra in IMAGE_EXTRAS for word in ("--extra", extra)
    ]


# --- docker/prometheus*.yml ---------------------------------------------------------------


# The error rate is judged once this many order deductions settled
# (STOCK_SYNC_ALERT_MIN_OPERATIONS).
MIN_SETTLED_CLAUSE = (
    " and sum without (outcome) (increase(stock_sync_order_deductions_settled_total[1h])) >= 10"
)


def test_the_four_alerts_watch_the_metrics_server_at_the_default_thresholds() -> None:
    rules = alert_rules()
    assert rules["StockSyncHighErrorRate"]["expr"].endswith(MIN_SETTLED_CLAUSE)
    for name, (metric, comparison, threshold, duration) in ALERTS.items():
        rule = rules[name]
        expression = rule["expr"].strip().removesuffix(MIN_SETTLED_CLAUSE)
        match = re.fullmatch(r"(.+?)\s*(>=|>|==)\s*([0-9.]+)", expression, re.DOTALL)
        assert match, f"{name}: unexpected expression {rule['expr']!r}"
        assert re.search(rf"\b{metric}\b", match.group(1)), name
        assert match.group(2) == comparison, name
        assert float(match.group(3)) == threshold, name
        assert rule["for"] == duration, name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["description"], name


RUNBOOK = "https://github.com/stock-sync/stock-sync/blob/main/README.md#runbook-"


def test_every_alert_links_its_runbook_anchor_in_the_readme() -> None:
    rules = alert_rules()
    assert rules, "no alert rules"
    for name, rule in rules.items():
        assert rule["annotations"]["runbook_url"] == RUNBOOK + name.lower(), name


def test_prometheus_scrapes_the_metrics_server_and_flower() -> None:
    document = yaml.safe_load(PROMETHEUS_FILE.read_text())
    targets = {
        target
        for job in document["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    assert {"metrics:9808", "flower:5555"} <= targets
    assert all(
        job.get("metrics_path", "/metrics") == "/metrics" for job in document["scrape_configs"]
    )
    assert document["rule_files"] == ["/etc/prometheus/prometheus-alerts.yml"]


# The counters grow by a steady amount a minute, so increase() over 1h gives their ratio.
def histogram(case: str, per_minute: dict[str, int]) -> list[dict[str, str]]:
    """stock_sync_processing_seconds_bucket series of ``case`` growing by ``per_minute``
    observations per bucket bound (cumulative, as exposed)."""
    return [
        {
            "series": f'stock_sync_processing_seconds_bucket{{le="{bound}",case="{case}"}}',
            "values": f"0+{count}x60",
        }
        for bound, count in per_minute.items()
    ]


def settled(case: str, completed: float, failed: float) -> list[dict[str, str]]:
    return [
        {
            "series": "stock_sync_order_deductions_settled_total"
            f'{{outcome="{outcome}",case="{case}"}}',
            "values": f"0+{per_minute:g}x60",
        }
        for outcome, per_minute in (("completed", completed), ("failed", failed))
    ]


def last_success(task: str, case: str, values: str) -> list[dict[str, str]]:
    return [{"series": f'{LAST_SUCCESS}{{task="{task}",case="{case}"}}', "values": values}]


PROMTOOL_SERIES = [
    {"series": 'stock_sync_stuck_operations{case="at"}', "values": "1x60"},
    {"series": 'stock_sync_stuck_operations{case="below"}', "values": "0x60"},
    *settled("at", completed=4, failed=1),  # 20 %
    *settled("below", completed=81, failed=19),  # 19 %
    *settled("too_few", completed=0.4, failed=0.1),  # 20 %, but under 10 settled in the hour
    # 10 % of the completions above 300 s: the p95 is above; 1 %: below
    *histogram("above", {"300": 9, "600": 10, "+Inf": 10}),
    *histogram("below", {"300": 99, "600": 100, "+Inf": 100}),
    {"series": 'stock_sync_cancellations_total{case="at"}', "values": "0+1x60"},
    {"series": 'stock_sync_operations_created_total{case="at"}', "values": "0+10x60"},
    {"series": 'stock_sync_cancellations_total{case="below"}', "values": "0+9x60"},
    {"series": 'stock_sync_operations_created_total{case="below"}', "values": "0+100x60"},
    {"series": 'stock_sync_failed_rollbacks{case="at"}', "values": "1x60"},
    {"series": 'stock_sync_failed_rollbacks{case="below"}', "values": "0x60"},
    {"series": 'stock_sync_marketplace_drift{state="found",case="at"}', "values": "0x2 1x58"},
    {"series": 'stock_sync_marketplace_drift{state="found",case="below"}', "values": "0x60"},
    {"series": 'stock_sync_marketplace_drift{state="unrepaired",case="at"}', "values": "1x60"},
    {"series": 'stock_sync_database_up{case="at"}', "values": "0x60"},
    {"series": 'stock_sync_database_up{case="below"}', "values": "1x60"},
    {"series": 'stock_sync_broker_up{case="at"}', "values": "0x60"},
    {"series": 'stock_sync_broker_up{case="below"}', "values": "1x60"},
    {"series": 'stock_sync_microservice_up{case="at"}', "values": "0x60"},
    {"series": 'stock_sync_microservice_up{case="below"}', "values": "1x60"},
    # Unix time of the last success: 0 (the start of the test's clock) ages with time();
    # one renewed every minute stays fresh
    *last_success("beat", "at", "0x60"),
    *last_success("beat", "below", "0+60x60"),
    *last_success("sweep_stuck_operations", "at", "0x60"),
    *last_success("evaluate_alerts", "below", "0+60x60"),
    *last_success("reconcile", "at", "0x1700"),  # daily: stale after 26 h
]
PROMTOOL_CASES = {
    # alert name: (minutes before it may fire, minutes after, the labels of the firing series)
    "StockSyncStuckOperations": (4, 6, {"case": "at"}),
    # pending from minute 2, when 10 settled in the hour: fires at 12
    "StockSyncHighErrorRate": (11, 13, {"case": "at"}),
    "StockSyncSlowProcessing": (9, 11, {"case": "above"}),
    "StockSyncFrequentCancellations": (29, 31, {"case": "at"}),
    "StockSyncFailedRollbacks": (0, 2, {"case": "at"}),
    # found from minute 2 on; the unrepaired series is not its business
    "StockSyncMarketplaceDrift": (1, 3, {"case": "at", "state": "found"}),
    "StockSyncMetricsDatabaseDown": (4, 6, {"case": "at"}),
    "StockSyncBrokerDown": (4, 6, {"case": "at"}),
    "StockSyncMicroserviceDown": (4, 6, {"case": "at"}),
    # older than 300 s from minute 6 on, for 2 minutes
    "StockSyncBeatDown": (7, 9, {"case": "at", "task": "beat"}),
    # older than 600 s from minute 11 on, for 5 minutes; the reconciliation is not its business
    "StockSyncMaintenanceStale": (15, 17, {"case": "at", "task": "sweep_stuck_operations"}),
    # older than 26 h from minute 1561 on, for an hour
    "StockSyncReconciliationStale": (1620, 1622, {"case": "at", "task": "reconcile"}),
}


def test_promtool_accepts_the_rules_and_they_fire_at_their_thresholds(tmp_path: Path) -> None:
    """`promtool check rules` passes and each rule fires exactly at its threshold after its
    `for:` (tests/ensure_promtool.sh puts promtool in .venv/bin)."""
    assert set(PROMTOOL_CASES) == set(ALERTS)
    check = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS_FILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    cases = []
    rules = alert_rules()
    for name, (before, after, firing) in PROMTOOL_CASES.items():
        labels = {**rules[name]["labels"], **firing}
        cases.append({"eval_time": f"{before}m", "alertname": name, "exp_alerts": []})
        cases.append(
            {"eval_time": f"{after}m", "alertname": name, "exp_alerts": [{"exp_labels": labels}]}
        )
    result = run_rule_tests(tmp_path, PROMTOOL_SERIES, cases)
    assert result.returncode == 0, result.stdout + result.stderr
