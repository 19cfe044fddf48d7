"""deploy/: the image, the compose stack, the Helm chart and the monitoring config.

No Docker engine or cluster here: these tests parse every file, render the
chart (with ``helm`` where it is installed, else with tests/helm_render.py's
strict subset renderer) and check that everything they reference exists: each
``ATELIER_*`` variable is a setting, each ``atelier`` command parses with the
real CLI parser, ports and probe paths line up, and each metric a dashboard
or alert queries is one Atelier exports.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from orchestrator.cli import build_parser
from orchestrator.infra import metrics
from orchestrator.infra.settings import Settings
from orchestrator.store.queue import SentinelTarget
from tests.helm_render import render_chart

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "atelier"
SETTINGS = {f"ATELIER_{name.upper()}" for name in Settings.model_fields}
ATELIER_VAR = re.compile(r"\bATELIER_[A-Z0-9_]+\b")
API_PATHS = {"/healthz", "/readyz", "/metrics"}


def parse_cli(argv: list[str]) -> Any:
    """Parse ``argv`` (without the leading ``atelier``) with the real parser; fail the test on an error."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`atelier {shlex.join(argv)}` does not parse (exit {exc.code})")


def settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def exported_series() -> set[str]:
    """Every sample name Atelier's metrics module exports (counters as ``*_total``, histogram parts)."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("atelier_"):
            continue
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\batelier_[a-z0-9_]+\b", expr))


def test_metrics_module_is_loaded() -> None:
    assert metrics.JOBS is not None and "atelier_jobs_total" in exported_series()


# -- every ATELIER_* name anywhere under deploy/ -------------------------------------------

def test_every_atelier_variable_in_deploy_is_a_setting() -> None:
    seen: dict[str, set[str]] = {}
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            for name in ATELIER_VAR.findall(path.read_text()):
                seen.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    unknown = {name: sorted(files) for name, files in seen.items() if name not in SETTINGS}
    assert not unknown, f"not settings (orchestrator/settings.py): {unknown}"
    assert {"ATELIER_REDIS_URL", "ATELIER_STORAGE_URL", "ATELIER_WORKER_METRICS_PORT",
            "ATELIER_S3_PUBLIC_ENDPOINT_URL"} <= set(seen)


# -- Dockerfile ----------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_multi_stage_slim_non_root_with_the_cli_as_entry_point() -> None:
    instructions = dockerfile_instructions()
    stages: list[list[tuple[str, str]]] = []
    for word, rest in instructions:
        if word == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word, rest))
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    args = dict(rest.split("=", 1) for word, rest in instructions if word == "ARG" and "=" in rest)
    python = args.get("PYTHON_IMAGE", "")
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert "slim" in python and requires.removeprefix(">=") in python

    build, final = stages[0], stages[-1]
    assert any(w == "RUN" and "pip install ." in r for w, r in build)
    final_text = " ".join(r for _, r in final)
    for tool in ("build-essential", "gcc", "apt-get install", "pip install"):
        assert tool not in final_text, f"{tool!r} in the final stage"
    assert any(w == "COPY" and r.startswith("--from=build") for w, r in final)
    users = [r for w, r in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")

    entry = json.loads(next(r for w, r in final if w == "ENTRYPOINT"))
    assert entry == ["atelier"]
    cmd = json.loads(next(r for w, r in final if w == "CMD"))
    served = parse_cli(cmd)
    assert served.command == "serve"
    exposed = {int(p) for w, r in final if w == "EXPOSE" for p in r.split()}
    assert {served.port, Settings().worker_metrics_port} <= exposed

    health = next(r for w, r in final if w == "HEALTHCHECK")
    probe = json.loads(health.split("CMD", 1)[1].strip())
    assert probe[0] == "atelier" and parse_cli(probe[1:]).command == "healthcheck"


def test_dockerfile_copies_what_exists_and_dockerignore_lets_it_through() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for word, rest in dockerfile_instructions():
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _dest = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the build context (repository root)"
                assert source.rstrip("/") in allowed, f"COPY {source}: excluded by .dockerignore"


# -- compose -------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """docker compose's ``${VAR}`` / ``${VAR:-default}`` / ``$$`` interpolation."""
    if isinstance(value, str):
        out = _INTERPOLATION.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
        return out.replace("$$", "$")
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = interpolate(yaml.safe_load((DEPLOY / "compose.yaml").read_text()), env or {})
    return data


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            pairs[name.strip()] = value.strip()
    return pairs


def test_compose_services_health_checks_and_scaling() -> None:
    services = compose()["services"]
    assert {"api", "worker", "redis", "minio", "minio-init"} <= set(services)
    for name, service in services.items():
        if name != "minio-init":
            assert "healthcheck" in service, f"{name} has no health check"
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker, "`--scale worker=N` needs no fixed name/port"
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["minio-init"]["condition"] == "service_completed_successfully"
        assert services[name]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert (DEPLOY / services[name]["build"]["context"] / services[name]["build"]["dockerfile"]).is_file()


def test_compose_redis_keeps_an_append_only_file_on_a_volume() -> None:
    data = compose()
    redis = data["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    volume = redis["volumes"][0].split(":")
    assert volume[0] in data["volumes"] and volume[1] == "/data"


def test_compose_creates_the_bucket_the_storage_url_names() -> None:
    for env in ({}, env_example(), {"S3_BUCKET": "renders"}):
        services = compose(env)["services"]
        init = services["minio-init"]
        script = " ".join(init["command"])
        bucket = init["environment"]["S3_BUCKET"]
        assert "mc mb" in script and "$S3_BUCKET" in script
        assert init["depends_on"]["minio"]["condition"] == "service_healthy"
        storage = services["api"]["environment"]["ATELIER_STORAGE_URL"]
        assert storage.startswith(f"s3://{bucket}/")
        api_env = services["api"]["environment"]
        assert api_env["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
        assert api_env["AWS_SECRET_ACCESS_KEY"] == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]


def test_compose_commands_ports_and_settings_line_up(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose(env_example())["services"]
    for name in ("api", "worker", "sandbox"):
        assert parse_cli(services[name]["command"]).command in ("serve", "worker", "sandbox")
        probe = services[name]["healthcheck"]["test"]
        assert probe[:2] == ["CMD", "atelier"]
        parse_cli(probe[2:])
    api_env = services["api"]["environment"]
    assert services["worker"]["environment"] == api_env
    settings = settings_from_env({k: str(v) for k, v in api_env.items()}, monkeypatch)
    assert settings.redis_url == "redis://redis:6379/0" and settings.s3_endpoint_url == "http://minio:9000"

    serve = parse_cli(services["api"]["command"])
    published = services["api"]["ports"][0].split(":")
    assert int(published[-1]) == serve.port
    assert services["api"]["healthcheck"]["test"][-1] == f"http://127.0.0.1:{serve.port}/readyz"

    worker = parse_cli(services["worker"]["command"])
    assert worker.metrics_port == settings.worker_metrics_port
    assert services["worker"]["expose"] == [str(worker.metrics_port)]
    assert services["worker"]["healthcheck"]["test"][-1] == f"http://127.0.0.1:{worker.metrics_port}/healthz"
    grace = int(services["worker"]["stop_grace_period"].rstrip("s"))
    assert grace > worker.completion_wait, "the stop grace period must outlast --completion-wait"

    sandbox = parse_cli(services["sandbox"]["command"])
    assert settings.sandbox_url == f"http://sandbox:{sandbox.port}"


def test_env_example_names_are_wired_into_compose() -> None:
    raw = (DEPLOY / "compose.yaml").read_text()
    for name in env_example():
        assert "${" + name in raw, f"{name} in .env.example is not used by compose.yaml"


# -- Helm chart ----------------------------------------------------------------------------

def docs(rendered: dict[str, list[dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [d for file_docs in rendered.values() for d in file_docs if d.get("kind") == kind]


def one(rendered: dict[str, list[dict[str, Any]]], kind: str, suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs(rendered, kind) if d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"{kind} *{suffix}: {len(found)}"
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = only
    return result


def env_of(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """The environment both Deployments get from the chart's ConfigMap and Secret."""
    env = dict(one(rendered, "ConfigMap")["data"])
    env.update(one(rendered, "Secret").get("stringData") or {})
    return env


def test_chart_metadata_matches_the_project() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2" and chart["name"] == "atelier"
    assert chart["appVersion"] == project["version"]


def test_chart_renders_api_and_worker_with_probes_and_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    rendered = render_chart(CHART)
    kinds = sorted(d["kind"] for file_docs in rendered.values() for d in file_docs)
    assert kinds == sorted(["ConfigMap", "Deployment", "Deployment", "HorizontalPodAutoscaler",
                            "PodDisruptionBudget", "PodDisruptionBudget", "Secret", "Service", "ServiceAccount"])
    for doc in (d for file_docs in rendered.values() for d in file_docs):
        assert doc["apiVersion"] and doc["metadata"]["name"].startswith("atl-atelier")
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "atl"

    api = one(rendered, "Deployment", "-api")
    c = container(api)
    serve = parse_cli(c["args"])
    assert serve.command == "serve" and serve.port == values["api"]["port"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": serve.port}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert "replicas" not in api["spec"], "the API's replicas belong to its HPA"
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in API_PATHS and int(annotations["prometheus.io/port"]) == serve.port
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"

    service = one(rendered, "Service")
    assert service["spec"]["ports"][0]["targetPort"] in ports
    assert service["spec"]["selector"] == api["spec"]["selector"]["matchLabels"]

    worker = one(rendered, "Deployment", "-worker")
    w = container(worker)
    args = parse_cli(w["args"])
    assert args.command == "worker" and args.queues == values["worker"]["queues"]
    pod = worker["spec"]["template"]["spec"]
    assert args.completion_wait == values["worker"]["completionWait"]
    assert pod["terminationGracePeriodSeconds"] >= args.completion_wait + 10, "SIGKILL before jobs finish"
    assert {p["name"]: p["containerPort"] for p in w["ports"]} == {"metrics": args.metrics_port}
    assert w["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert worker["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(args.metrics_port)

    for deployment in (api, worker):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert api["spec"]["selector"] != worker["spec"]["selector"]
    for pod_spec in (api["spec"]["template"]["spec"], pod):
        assert pod_spec["securityContext"]["runAsNonRoot"] is True
        cont = pod_spec["containers"][0]
        assert cont["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"name": "tmp", "mountPath": "/tmp"} in cont["volumeMounts"]
        refs = [next(iter(ref.values()))["name"] for ref in cont["envFrom"]]
        assert refs == ["atl-atelier", "atl-atelier"]

    hpa = one(rendered, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == api["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"

    env = env_of(rendered)
    for name in env:
        assert name in SETTINGS or name == "AWS_DEFAULT_REGION", f"{name} is not a setting"
    settings = settings_from_env(env, monkeypatch)
    assert settings.worker_metrics_port == args.metrics_port
    assert settings.queue_name == values["queue"]["name"] and settings.storage_url == values["storage"]["url"]
    assert settings.redis_url == values["redis"]["url"]


def test_chart_sentinel_redis_url_round_trips() -> None:
    password = "p@ss:w/rd+1"
    rendered = render_chart(CHART, {"redis": {"sentinel": {
        "enabled": True, "hosts": ["redis-node-0.redis-headless:26379", "redis-node-1.redis-headless:26379"],
        "masterName": "primary", "password": "sentinel pw"}, "password": password, "db": 2}})
    url = env_of(rendered)["ATELIER_REDIS_URL"]
    target = SentinelTarget.parse(url)
    assert target.sentinels == [("redis-node-0.redis-headless", 26379), ("redis-node-1.redis-headless", 26379)]
    assert (target.master, target.db, target.password) == ("primary", 2, password)
    assert target.sentinel_password is not None


def test_chart_existing_secrets_and_provider_keys() -> None:
    rendered = render_chart(CHART, {
        "redis": {"existingSecret": "redis-creds"},
        "secrets": {"existingSecret": "provider-keys", "env": {"ATELIER_REPLICATE_API_KEY": "r8_a,r8_b"}},
        "storage": {"s3": {"endpointUrl": "http://minio:9000", "publicEndpointUrl": "https://s3.example.com",
                           "accessKeyId": "AKIA", "secretAccessKey": "s3cr3t"}},
        "metrics": {"podMonitor": {"enabled": True}},
    })
    secret = one(rendered, "Secret")["stringData"]
    assert "ATELIER_REDIS_URL" not in secret
    assert secret["ATELIER_REPLICATE_API_KEY"] == "r8_a,r8_b" and secret["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    for name in secret:
        assert name in SETTINGS or name.startswith("AWS_")
    config = one(rendered, "ConfigMap")["data"]
    assert config["ATELIER_S3_PUBLIC_ENDPOINT_URL"] == "https://s3.example.com"
    for deployment in docs(rendered, "Deployment"):
        c = container(deployment)
        assert {"secretRef": {"name": "provider-keys"}} in c["envFrom"]
        (redis_env,) = c["env"]
        assert redis_env["name"] == "ATELIER_REDIS_URL"
        assert redis_env["valueFrom"]["secretKeyRef"] == {"name": "redis-creds", "key": "redis-url"}
    monitor = one(rendered, "PodMonitor")
    port_names = {p["name"] for d in docs(rendered, "Deployment") for p in container(d)["ports"]}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == port_names
    assert {e["path"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"/metrics"}


def test_chart_worker_autoscaling_on_queue_depth() -> None:
    keda = render_chart(CHART, {"worker": {"autoscaling": {"enabled": True, "mode": "keda"}}})
    scaled = one(keda, "ScaledObject")
    worker = one(keda, "Deployment", "-worker")
    assert "replicas" not in worker["spec"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert query == 'max(atelier_queue_jobs{queue="atelier:jobs",state="due"})'
    assert metric_names(query) <= exported_series()
    assert float(trigger["metadata"]["threshold"]) > 0

    hpa = render_chart(CHART, {"worker": {"autoscaling": {"enabled": True, "mode": "hpa"}}})
    worker_hpa = one(hpa, "HorizontalPodAutoscaler", "-worker")
    assert worker_hpa["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert worker_hpa["spec"]["metrics"][0]["type"] == "External"
    assert not docs(hpa, "ScaledObject")


@pytest.mark.skipif(shutil.which("helm") is None,
                    reason="helm is not installed here (no registry package provides it); "
                           "the chart is rendered by tests/helm_render.py instead")
def test_helm_lint_and_template() -> None:  # pragma: no cover - only where helm exists
    lint = subprocess.run(["helm", "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    for flags in ([], ["--set", "worker.autoscaling.enabled=true"],
                  ["--set", "redis.sentinel.enabled=true", "--set", "redis.sentinel.hosts={s0:26379}"]):
        out = subprocess.run(["helm", "template", "atl", str(CHART), *flags], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        rendered = list(yaml.safe_load_all(out.stdout))
        assert any(d and d.get("kind") == "Deployment" for d in rendered)


# -- Grafana and Prometheus ----------------------------------------------------------------

def dashboard_exprs() -> list[str]:
    board = json.loads((DEPLOY / "grafana" / "atelier.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in board["templating"]["list"] if "definition" in v]
    return exprs


def test_grafana_dashboard_covers_every_metric_and_nothing_else() -> None:
    board = json.loads((DEPLOY / "grafana" / "atelier.json").read_text())
    assert board["uid"] and board["title"] == "Atelier"
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    exported = exported_series()
    assert used <= exported, f"unknown metrics: {used - exported}"
    families = {n.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
                for n in exported}
    covered = {n.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
               for n in used}
    assert families <= covered, f"not on the dashboard: {families - covered}"
    for expr in dashboard_exprs():
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr


def test_prometheus_alerts() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    (group,) = rules["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    for needed in ("AtelierJobsStuck", "AtelierWebhookDeadLetters", "AtelierProviderErrorRate",
                   "AtelierProviderKeyOutOfPool"):
        assert needed in alerts
    exported = exported_series()
    for name, rule in alerts.items():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, name
        assert rule["labels"]["severity"] in ("critical", "warning", "info") and rule["annotations"]["summary"]
        expr = rule["expr"]
        assert metric_names(expr) and metric_names(expr) <= exported, f"{name}: {metric_names(expr) - exported}"
        assert expr.count("(") == expr.count(")"), name
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), name


def test_readme_documents_deploy_scaling_and_every_metric() -> None:
    readme = (ROOT / "README.md").read_text()
    for heading in ("## Deploy", "## Scaling", "## Metrics"):
        assert heading in readme
    assert "docker compose -f deploy/compose.yaml up" in readme and "helm install" in readme
    families = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in exported_series()}
    missing = {f for f in families if f not in readme}
    assert not missing, f"metrics not in the README: {missing}"
    for name in ("ATELIER_WORKER_METRICS_PORT", "ATELIER_S3_PUBLIC_ENDPOINT_URL"):
        assert f"`{name}`" in readme


# -- every `atelier ...` command the docs and deploy files show ---------------------------

_COMMAND_SPOTS = (
    re.compile(r"`atelier ([^`]+)`"),                  # inline code
    re.compile(r"(?:^|\s)-- atelier ([^\n#]+)", re.M),  # kubectl exec ... -- atelier ...
    re.compile(r"run --rm api ([^\n#]+)"),             # docker compose run --rm api <args>
    re.compile(r"docker run atelier ([^\n#]+)"),       # the image's entry point is the CLI
)


def shown_commands() -> list[tuple[str, str]]:
    found = []
    files = [ROOT / "README.md", *(p for p in DEPLOY.rglob("*") if p.is_file())]
    for path in files:
        text = path.read_text()
        for pattern in _COMMAND_SPOTS:
            for match in pattern.finditer(text):
                found.append((str(path.relative_to(ROOT)), match.group(1).strip()))
    return found


def test_every_atelier_command_shown_exists() -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    shown = shown_commands()
    assert len(shown) > 15
    for where, command in shown:
        words = [w.strip("[],`()") for w in command.split()]
        sub = commands.get(words[0])
        assert sub is not None, f"{where}: `atelier {command}`: no command {words[0]!r}"
        rest = words[1:]
        if sub._subparsers is not None and rest and not rest[0].startswith("-"):
            sub = sub._subparsers._group_actions[0].choices.get(rest[0])
            assert sub is not None, f"{where}: `atelier {command}`"
            rest = rest[1:]
        for word in rest:
            if word.startswith("--"):
                flag = word.split("=")[0]
                assert flag in sub._option_string_actions, f"{where}: `atelier {command}`: no option {flag}"
