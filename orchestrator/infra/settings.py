"""Settings: environment variables with the ``ATELIER_`` prefix, plus an optional TOML file.

The TOML file (``ATELIER_CONFIG_FILE``) holds per-provider tables, for what does
not fit one environment variable::

    [providers.replicate]
    api_keys = ["r8_a...", "r8_b..."]
    base_url = "https://gateway.example.com/replicate"
    typical_seconds = { image = 6, video = 120, "minimax/video-01" = 300 }  # per kind or per model
    job_timeout_seconds = 7200
    job_timeout_by_model = { "minimax/video-01" = 1800, "google/veo-*" = 5400 }
    request_timeout_seconds = 60                                 # one create request (synchronous images)
    request_timeout_by_model = { "gpt-image-*" = 300 }
    concurrency = 4                                              # tasks (or synchronous calls) in flight per key

Environment variables win over the file.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from providers.contract import ProviderSettings
from providers.registry import ADAPTERS

# Every provider with an adapter; its defaults (base URL, typical render time per kind, concurrency)
# are the adapter's class attributes.
PROVIDERS = tuple(ADAPTERS)

SANDBOX_KEY = "sandbox-key"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATELIER_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    storage_url: str = "./.atelier/storage"
    s3_endpoint_url: str | None = None
    # Endpoint that presigned output URLs name, when clients reach the store at another address
    # than Atelier does (e.g. MinIO in docker compose: http://minio:9000 inside, localhost:9000 outside).
    s3_public_endpoint_url: str | None = None
    public_url: str = "http://127.0.0.1:8000"
    config_file: Path | None = None

    # Ask providers to call us back (auto: when the public URL is HTTPS, or in sandbox mode).
    callbacks: Literal["auto", "on", "off"] = "auto"
    sandbox: bool = False
    sandbox_url: str = "http://127.0.0.1:8790"

    # Secret for signing local-storage file URLs; generated and kept in Redis when unset.
    file_url_secret: SecretStr | None = None
    # Secret for signing dashboard session cookies and CSRF tokens; generated and kept in Redis when unset.
    dashboard_secret: SecretStr | None = None
    dashboard_session_seconds: int = Field(8 * 3600, gt=0)
    # Tenants whose API keys are operators' (comma-separated): the dashboard shows them the deployment's
    # operations (provider key pools, budgets, polls, overdue jobs, dead deliveries); nobody by default.
    admin_tenants: str = ""
    output_url_ttl_seconds: int = 3600
    webhook_url_ttl_seconds: int = 7 * 24 * 3600
    max_output_bytes: int = 2 * 1024**3
    max_request_bytes: int = 1024 * 1024
    # POST /v1/uploads: the largest file a tenant may upload as a job's media input.
    max_upload_bytes: int = Field(50 * 1024 * 1024, gt=0)
    idempotency_ttl_seconds: int = 7 * 24 * 3600
    # A finished job's records (job, events, indexes, task mapping, deliveries) and stored outputs are
    # reaped this long after it finished; finished batches likewise. Per tenant: `atelier tenants retention`.
    retention_seconds: int = Field(30 * 24 * 3600, gt=0)
    max_batch_request_bytes: int = 32 * 1024 * 1024
    batch_progress_interval_seconds: float = 10.0

    http_timeout_seconds: float = 30.0
    poll_min_seconds: float = 2.0
    poll_max_seconds: float = 60.0
    poll_backoff: float = 1.6
    # With a request budget (rpm), spend what due polls leave unused on reading waiting jobs before their
    # schedule says, each no more often than its share of the budget (finished work is noticed sooner).
    poll_spare_budget: bool = True
    job_timeout_seconds: float = 3 * 3600.0
    submit_max_attempts: int = 8
    # A provider key taken out of the pool for want of balance is tried again after this long
    # (a refused key stays out until `atelier provider-keys restore`).
    key_recheck_seconds: float = Field(900.0, gt=0)

    webhook_timeout_seconds: float = 10.0
    webhook_retry_schedule: str = "0,5,300,1800,7200,18000,36000,36000"
    # Send webhooks to loopback, private, link-local... addresses (off: refused at registration and delivery).
    webhook_allow_private: bool = False
    # Fetch media inputs a tenant names (image_url...) from such addresses too; unset: as webhooks.
    fetch_allow_private: bool | None = None
    # A webhook endpoint whose deliveries have failed without a success for this long is disabled.
    webhook_disable_after_seconds: float = 5 * 24 * 3600.0
    # Fairness between receivers: attempts in flight per destination (an endpoint, or a tenant's
    # webhook_url origin: the first; with the second set higher, adapting up to it by how the
    # destination answers) and per tenant (0: no cap); a destination that failed this many times in
    # a row is left alone for a cool-down (doubling per failed probe, up to the longest), its
    # deliveries parked outside the queue meanwhile.
    webhook_endpoint_concurrency: int = Field(8, ge=1)
    webhook_endpoint_concurrency_max: int | None = Field(None, ge=1)
    webhook_tenant_concurrency: int = Field(50, ge=0)
    webhook_circuit_failures: int = Field(5, ge=1)
    webhook_circuit_cooldown_seconds: float = Field(5.0, gt=0)
    webhook_circuit_max_cooldown_seconds: float = Field(300.0, gt=0)

    queue_name: str = "atelier:jobs"
    webhook_queue_name: str = "atelier:webhooks"
    worker_max_jobs: int = 200
    worker_poll_delay: float = 0.05
    sweep_grace_seconds: float = 90.0
    # `atelier worker` serves Prometheus metrics and /healthz on this port (0: off).
    worker_metrics_port: int = 9100

    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"

    sora_api_key: SecretStr | None = None
    sora_base_url: str | None = None
    veo_api_key: SecretStr | None = None
    veo_base_url: str | None = None
    kling_api_key: SecretStr | None = None  # a gateway's key (Bearer) instead of Kling's own key pair
    kling_access_key: SecretStr | None = None
    kling_secret_key: SecretStr | None = None
    kling_base_url: str | None = None
    runway_api_key: SecretStr | None = None
    runway_base_url: str | None = None
    suno_api_key: SecretStr | None = None
    suno_base_url: str | None = None
    suno_flavor: Literal["gateway", "sunoapi"] = "gateway"
    replicate_api_key: SecretStr | None = None
    replicate_base_url: str | None = None
    replicate_webhook_secret: SecretStr | None = None
    fal_api_key: SecretStr | None = None
    fal_base_url: str | None = None
    fal_jwks_url: str = "https://rest.alpha.fal.ai/.well-known/jwks.json"

    # Per provider and per API key: tasks in flight, and requests per minute (submits and polls).
    sora_concurrency: int | None = None
    sora_rpm: float | None = None
    veo_concurrency: int | None = None
    veo_rpm: float | None = None
    kling_concurrency: int | None = None
    kling_rpm: float | None = None
    runway_concurrency: int | None = None
    runway_rpm: float | None = None
    suno_concurrency: int | None = None
    suno_rpm: float | None = None
    replicate_concurrency: int | None = None
    replicate_rpm: float | None = None
    fal_concurrency: int | None = None
    fal_rpm: float | None = None

    providers_file: dict[str, dict[str, Any]] = Field(default_factory=dict, exclude=True)

    @field_validator("storage_url")
    @classmethod
    def _absolute_storage(cls, value: str) -> str:
        if "://" in value:
            return value
        return "file://" + str(Path(value).expanduser().resolve())

    def model_post_init(self, __context: Any) -> None:
        if self.config_file is not None and not self.providers_file:
            data = tomllib.loads(Path(self.config_file).read_text())
            self.providers_file = dict(data.get("providers", {}))

    @property
    def allow_private_fetches(self) -> bool:
        return self.webhook_allow_private if self.fetch_allow_private is None else self.fetch_allow_private

    @property
    def callbacks_enabled(self) -> bool:
        if self.callbacks == "auto":
            return self.sandbox or self.public_url.startswith("https://")
        return self.callbacks == "on"

    @property
    def retry_schedule(self) -> list[float]:
        return [float(x) for x in self.webhook_retry_schedule.split(",") if x.strip()]

    @property
    def admins(self) -> frozenset[str]:
        """The tenants ``ATELIER_ADMIN_TENANTS`` names."""
        return frozenset(t.strip() for t in self.admin_tenants.split(",") if t.strip())

    def secret_values(self) -> list[str]:
        """Every configured secret (provider keys, signing secrets): the logs mask them."""
        values = [v.get_secret_value() for v in self.__dict__.values() if isinstance(v, SecretStr)]
        for cfg in self.provider_settings().values():
            values += cfg.api_keys
            values += [str(v) for k, v in cfg.extra.items() if "secret" in k or k.endswith("_key")]
        return [v for v in values if v]

    def provider_settings(self) -> dict[str, ProviderSettings]:
        """Settings of every provider that has a base URL (configured, default, or sandbox)."""
        result = {}
        for name in PROVIDERS:
            cfg = self._provider(name)
            if cfg is not None:
                result[name] = cfg
        return result

    def _env(self, name: str, suffix: str) -> Any:
        """``ATELIER_<NAME>_<SUFFIX>``: a declared field for the first providers, else read from the
        environment as it is (providers added later need no field each)."""
        if f"{name}_{suffix}" in type(self).model_fields:
            return getattr(self, f"{name}_{suffix}")
        return os.environ.get(f"ATELIER_{name.upper()}_{suffix.upper()}") or None

    def _provider(self, name: str) -> ProviderSettings | None:
        adapter = ADAPTERS[name]
        file_cfg = dict(self.providers_file.get(name, {}))
        env_url = self._env(name, "base_url")
        base_url = env_url or file_cfg.pop("base_url", None)
        sandboxed = self.sandbox and not base_url
        if sandboxed:
            mount = "suno-api" if name == "suno" and self.suno_flavor == "sunoapi" else name
            base_url = f"{self.sandbox_url.rstrip('/')}/{mount}"
        base_url = base_url or adapter.default_base_url
        if not base_url:
            return None
        keys = self._keys(name, file_cfg.pop("api_keys", None))
        extra: dict[str, Any] = dict(file_cfg.pop("extra", {}))
        if name == "kling":
            extra.setdefault("access_key", _secret(self.kling_access_key) or ("sandbox-ak" if sandboxed else ""))
            extra.setdefault("secret_key", _secret(self.kling_secret_key) or ("sandbox-sk" if sandboxed else ""))
            if not keys and extra["access_key"]:
                keys = [extra["access_key"]]
        if name == "jimeng":  # Volcengine signs requests with an access key / secret key pair
            for part in ("access_key", "secret_key"):
                value = self._env(name, part)
                extra.setdefault(part, str(value) if value else (f"sandbox-{part[0]}k" if sandboxed else ""))
            if not keys and extra["access_key"]:
                keys = [extra["access_key"]]
        if name == "suno":
            extra.setdefault("flavor", self.suno_flavor)
        if name == "veo" and (version := self._env(name, "api_version")):
            extra["api_version"] = str(version)  # ATELIER_VEO_API_VERSION: v1beta (default) or v1
        if name == "fal":
            explicit = "fal_jwks_url" in self.model_fields_set
            extra.setdefault("jwks_url", self.fal_jwks_url if explicit or not sandboxed
                             else f"{base_url}/.well-known/jwks.json")
            if not keys and sandboxed:
                keys = [f"{SANDBOX_KEY}-id:{SANDBOX_KEY}-secret"]  # fal keys are '<key_id>:<key_secret>'
        if name == "replicate" and self.replicate_webhook_secret:
            extra.setdefault("webhook_secret", self.replicate_webhook_secret.get_secret_value())
        if not keys and sandboxed:
            keys = [SANDBOX_KEY]
        typical = dict(adapter.default_typical_seconds)
        if sandboxed:
            typical = {kind: 1.0 for kind in typical}
        typical.update(file_cfg.pop("typical_seconds", {}))
        return ProviderSettings(
            name=name,
            base_url=base_url,
            api_keys=keys,
            timeout_seconds=float(_number(self._env(name, "request_timeout_seconds"), float)
                                  or file_cfg.pop("request_timeout_seconds", None)
                                  or file_cfg.pop("timeout_seconds", self.http_timeout_seconds)),
            typical_seconds=typical,
            poll_initial_seconds=file_cfg.pop("poll_initial_seconds", None),
            poll_max_seconds=float(file_cfg.pop("poll_max_seconds", self.poll_max_seconds)),
            job_timeout_seconds=float(file_cfg.pop("job_timeout_seconds", self.job_timeout_seconds)),
            job_timeout_by_model=_timeouts_by_model(name, file_cfg.pop("job_timeout_by_model", {}),
                                                    "job_timeout_by_model"),
            concurrency=(_number(self._env(name, "concurrency"), int) or file_cfg.pop("concurrency", None)
                         or adapter.default_concurrency),
            rpm=_number(self._env(name, "rpm"), float) or file_cfg.pop("rpm", None),
            request_timeout_by_model=_timeouts_by_model(name, file_cfg.pop("request_timeout_by_model", {}),
                                                        "request_timeout_by_model"),
            models=dict(file_cfg.pop("models", {})),
            retired_models=[str(m) for m in file_cfg.pop("retired_models", [])],
            prices=dict(file_cfg.pop("prices", {})),
            extra=extra | file_cfg,
        )

    def _keys(self, name: str, from_file: list[str] | None) -> list[str]:
        raw = self._env(name, "api_key")
        env_value = _secret(raw) if isinstance(raw, SecretStr) or raw is None else str(raw)
        if env_value:
            return [k.strip() for k in env_value.split(",") if k.strip()]
        return list(from_file or [])


def _number(value: Any, kind: type[int] | type[float]) -> Any:
    """An ``ATELIER_<P>_...`` number: declared fields are already typed, raw environment values are not."""
    if value is None or isinstance(value, int | float):
        return value
    try:
        return kind(value)
    except ValueError as exc:
        raise ValueError(f"expected a number, got {value!r}") from exc


def _timeouts_by_model(provider: str, table: Any, key: str) -> dict[str, float]:
    """``job_timeout_by_model`` (or ``request_timeout_by_model``) of a provider's TOML table:
    model (or pattern) -> positive seconds."""
    where = f"[providers.{provider}] {key}"
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table of model = seconds")
    result = {}
    for model, seconds in table.items():
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
            raise ValueError(f"{where}: {model!r} must be a positive number of seconds, not {seconds!r}")
        result[str(model)] = float(seconds)
    return result


def _secret(value: SecretStr | None) -> str:
    return value.get_secret_value() if value is not None else ""
