"""Key pool health as the worker meets it: a key the provider refused, or whose account is out of
credit, leaves the pool for every process (``orchestrator.store.keypool``)."""

from __future__ import annotations

from orchestrator.domain.job import Job
from orchestrator.infra import metrics
from orchestrator.services.runtime import Runtime
from orchestrator.store import keypool
from providers.contract import Provider
from providers.errors import AuthFailed, InsufficientBalance
from workers.context import log, log_extra


async def take_key_out(rt: Runtime, provider: Provider, job: Job, kid: str,
                       exc: AuthFailed | InsufficientBalance) -> tuple[str, str]:
    """Take key ``kid`` out of the pool for every process; the first to see it raises the alert.
    Returns the reason and the provider's message (keys in it replaced by their fingerprints)."""
    balance = isinstance(exc, InsufficientBalance)
    reason = keypool.NO_BALANCE if balance else keypool.AUTH_FAILED
    message = keypool.redact(exc.message, provider.settings.api_keys)
    record = await keypool.take_out(rt.redis, job.provider, kid, reason=reason, code=exc.code, message=message,
                                    recheck_seconds=rt.settings.key_recheck_seconds if balance else None)
    if record is not None:
        metrics.key_taken_out(job.provider, reason)
        then = (f"tried again in {rt.settings.key_recheck_seconds:.0f}s" if balance
                else f"restore it with `atelier provider-keys restore {job.provider} {kid}` once fixed")
        log.error("%s key %s taken out of the pool (%s): %s; %s", job.provider, kid, reason, message, then,
                  extra={**log_extra(job, "key.out_of_pool"), "key_id": kid, "reason": reason})
    return reason, message
