"""docker-compose.yml: it validates, it has the shape the deployment relies on, and it holds no
secret. Checked with `docker-compose config` (Debian's `docker-compose` package, no daemon)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"

# Distinctive dummies, so finding one in the file text means a secret was written there.
SECRETS = {
    "POSTGRES_PASSWORD": "dummy-pg-pass-5e1f",
    "MINIO_ROOT_USER": "dummy-minio-user-8a2c",
    "MINIO_ROOT_PASSWORD": "dummy-minio-pass-3d9b",
}
ONE_SHOT = {"minio-bucket", "migrate"}
LONG_RUNNING = {
    "postgres",
    "redis",
    "minio",
    "api",
    "worker",
    "worker-default",
    "worker-predict",
    "scheduler",
    "flower",
    "prometheus",
}
APP = {"api", "worker", "worker-default", "worker-predict", "scheduler", "flower"}
# What a worker or the API needs before its first query, upload or message.
READY = {
    "migrate": "service_completed_successfully",
    "minio-bucket": "service_completed_successfully",
    "redis": "service_healthy",
}


def compose(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run docker-compose on the repository's file with only `env` (plus PATH) set; an empty
    env file keeps a developer's `.env` beside the compose file out of the result."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail(
            "docker-compose is not on PATH: install the Debian package `docker-compose` "
            "(apt-get install -y docker-compose); .ci/run does this on CI"
        )
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    return subprocess.run(
        [exe, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *args],
        env={"PATH": os.environ["PATH"], **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The resolved configuration (anchors merged, variables interpolated) for the dummies."""
    result = compose(tmp_path_factory.mktemp("compose"), "config", env=SECRETS)
    assert result.returncode == 0, result.stderr
    parsed = yaml.safe_load(result.stdout)
    assert isinstance(parsed, dict)
    return parsed


def published_ports(service: dict[str, Any]) -> dict[int, str]:
    """Published port -> host address ("" for all interfaces), from short or long syntax."""
    ports: dict[int, str] = {}
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports[int(port["published"])] = port.get("host_ip", "")
            continue
        parts = str(port).split("/")[0].split(":")
        host_ip = parts[0] if len(parts) == 3 else ""
        ports[int(parts[-2])] = host_ip
    return ports


def test_config_validates_with_only_the_required_variables(tmp_path: Path) -> None:
    result = compose(tmp_path, "config", "-q", env=SECRETS)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("name", sorted(SECRETS))
@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_config_refuses_a_missing_secret(tmp_path: Path, name: str, value: str | None) -> None:
    env = {k: v for k, v in SECRETS.items() if k != name}
    if value is not None:
        env[name] = value
    result = compose(tmp_path, "config", "-q", env=env)
    assert result.returncode != 0
    assert f"set {name}" in result.stderr
    assert not any(secret in result.stderr for secret in env.values() if secret)


def test_services(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) == ONE_SHOT | LONG_RUNNING
    for name in ONE_SHOT:
        assert services[name]["restart"] == "no", name
    for name in LONG_RUNNING:
        assert services[name]["restart"] == "unless-stopped", name
    for name in APP | {"migrate"}:
        assert Path(services[name]["build"]["context"]) == REPO, name


def test_commands_and_ports(config: dict[str, Any]) -> None:
    services = config["services"]
    assert services["api"]["command"] == ["strata", "api", "--host", "0.0.0.0", "--port", "8000"]
    assert published_ports(services["api"]) == {8000: ""}
    worker = " ".join(services["worker"]["command"])
    assert worker.startswith("celery -A workers.celery_app worker -Q train -P solo -c 1 -n gpu@%h")
    default = " ".join(services["worker-default"]["command"])
    assert default.startswith("celery -A workers.celery_app worker -Q default -P threads -c 4")
    assert "-n default@%h" in default
    predict = " ".join(services["worker-predict"]["command"])  # the API's predictions
    assert predict.startswith("celery -A workers.celery_app worker -Q predict -P threads")
    assert services["scheduler"]["command"] == ["strata", "scheduler"]
    assert services["flower"]["command"][:4] == ["celery", "-A", "workers.celery_app", "flower"]
    assert "--port=5555" in services["flower"]["command"]
    # Flower runs without a login: published on loopback only.
    assert published_ports(services["flower"]) == {5555: "127.0.0.1"}
    # Prometheus has no login either
    assert published_ports(services["prometheus"]) == {9090: "127.0.0.1"}
    for name in set(services) - {"api", "flower", "prometheus"}:
        assert "ports" not in services[name], name


def test_only_the_gpu_worker_reserves_a_gpu(config: dict[str, Any]) -> None:
    services = config["services"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    (gpu,) = devices
    assert gpu["driver"] == "nvidia"
    assert "gpu" in gpu["capabilities"]
    assert gpu["count"] in (1, "1", "all", -1)
    for name in set(services) - {"worker"}:
        assert "deploy" not in services[name], name


def test_start_order(config: dict[str, Any]) -> None:
    services = config["services"]

    def conditions(name: str) -> dict[str, str]:
        return {dep: c["condition"] for dep, c in services[name].get("depends_on", {}).items()}

    for name in ("api", "worker", "worker-default", "worker-predict"):
        assert conditions(name) == READY, name
    assert conditions("scheduler") == {
        "migrate": "service_completed_successfully",
        "redis": "service_healthy",
    }
    assert conditions("flower") == {"redis": "service_healthy"}
    assert conditions("migrate") == {"postgres": "service_healthy"}
    assert conditions("minio-bucket") == {"minio": "service_healthy"}
    # A condition on a service that cannot meet it would stall `up` forever.
    for name in services:
        for dep, condition in conditions(name).items():
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}'s healthcheck"
            else:
                assert condition == "service_completed_successfully", (name, dep)
                assert dep in ONE_SHOT, f"{name} waits for long-running {dep} to exit"


def test_healthchecks(config: dict[str, Any]) -> None:
    services = config["services"]
    for name in LONG_RUNNING:
        svc = services[name]
        waits_on_health = any(
            c["condition"] == "service_healthy" for c in svc.get("depends_on", {}).values()
        )
        assert "healthcheck" in svc or waits_on_health, name
    api = " ".join(services["api"]["healthcheck"]["test"])
    assert "urllib" in api
    assert "http://127.0.0.1:8000/health'" in api
    # a solo worker cannot answer pings mid-job: its health is the job heartbeat, not a check
    assert "healthcheck" not in services["worker"]
    flower = " ".join(services["flower"]["healthcheck"]["test"])
    assert "http://127.0.0.1:5555/healthcheck" in flower


def test_app_settings_come_from_the_environment(config: dict[str, Any]) -> None:
    pg, user, password = (
        SECRETS["POSTGRES_PASSWORD"],
        SECRETS["MINIO_ROOT_USER"],
        SECRETS["MINIO_ROOT_PASSWORD"],
    )
    database_url = f"postgresql+psycopg://strata:{pg}@postgres:5432/strata"
    for name in APP | {"migrate"}:
        env = config["services"][name]["environment"]
        assert env["STRATA_DATABASE_URL"] == database_url
        assert env["STRATA_BROKER_URL"] == "redis://redis:6379/0"
        assert env["STRATA_ARTIFACT_BACKEND"] == "minio"
        assert env["STRATA_MINIO_ENDPOINT"] == "minio:9000"
        assert env["STRATA_MINIO_ACCESS_KEY"] == user
        assert env["STRATA_MINIO_SECRET_KEY"] == password
        assert env["STRATA_MINIO_BUCKET"] == "strata"
    postgres = config["services"]["postgres"]["environment"]
    assert postgres["POSTGRES_PASSWORD"] == pg
    minio = config["services"]["minio"]["environment"]
    assert (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]) == (user, password)


def test_no_secret_is_written_in_the_file() -> None:
    text = COMPOSE_FILE.read_text()
    for value in SECRETS.values():
        assert value not in text
    # Every credential-like key takes its value from a `${...}` reference.
    pattern = re.compile(r"^\s*([A-Z_]*(?:PASSWORD|SECRET|ACCESS_KEY)[A-Z_]*):\s*(\S.*)$", re.M)
    found = pattern.findall(text)
    assert {key for key, _ in found} >= {
        "POSTGRES_PASSWORD",
        "MINIO_ROOT_PASSWORD",
        "STRATA_MINIO_ACCESS_KEY",
        "STRATA_MINIO_SECRET_KEY",
    }
    for key, value in found:
        assert value.startswith("${") and value.endswith("}"), f"{key}: {value}"
    # The database URL embeds the password: only as a reference.
    (url,) = re.findall(r"STRATA_DATABASE_URL: (\S+)", text)
    assert ":${POSTGRES_PASSWORD:?" in url


def test_env_example_lists_every_variable() -> None:
    referenced = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    example = (REPO / ".env.example").read_text()
    listed = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, re.M))
    assert referenced == listed
    assert set(SECRETS) <= referenced
    assert "`.env`" in example


def test_prometheus_scrapes_the_api_and_each_workers_metrics_port(config: dict[str, Any]) -> None:
    services = config["services"]
    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    mounts = {}  # target -> (source, read-only), from short (v1) or long syntax
    for v in prometheus["volumes"]:
        if isinstance(v, dict):
            mounts[v["target"]] = (v["source"], bool(v.get("read_only")))
        else:
            source, target, *mode = str(v).split(":")
            mounts[target] = (source, mode == ["ro"])
    source, read_only = mounts["/etc/prometheus/prometheus.yml"]
    assert Path(source) == REPO / "deploy" / "prometheus.yml" and read_only
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "/-/ready" in " ".join(prometheus["healthcheck"]["test"])
    workers = {"worker", "worker-default", "worker-predict"}
    for name in workers:  # each worker serves its own metrics: no pushgateway
        assert services[name]["environment"]["STRATA_METRICS_PORT"] == "9100", name
    for name in set(services) - workers:
        assert "STRATA_METRICS_PORT" not in services[name].get("environment", {}), name
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())["scrape_configs"]
    targets = {
        (name, sd["port"], job.get("metrics_path", "/metrics"))
        for job in scrape for sd in job["dns_sd_configs"] for name in sd["names"]
    }  # fmt: skip
    assert targets == {("api", 8000, "/metrics")} | {(w, 9100, "/metrics") for w in workers}
