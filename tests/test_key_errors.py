"""Each adapter tells a refused key (AuthFailed) and an empty account (InsufficientBalance) apart from
a rate limit or a bad request, from the provider's own wire answers (shared/providers/*.md)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from providers import fal, kling, runway, sora, suno, veo
from providers.contract import ProviderSettings
from providers.errors import AuthFailed, InsufficientBalance, ProviderError, RateLimited, Rejected
from providers.http import raise_for_common_status


def reply(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers,
                          request=httpx.Request("POST", "https://provider.example/v1/create"))


def raised(call: Any, *args: Any, **kwargs: Any) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        call(*args, **kwargs)
    return info.value


def test_common_statuses():
    problem = {"title": "Payment Required", "status": 402,
               "detail": "You have insufficient credit to run this model. Go to replicate.com/account/billing"}
    assert isinstance(raised(raise_for_common_status, reply(402, problem), creates=True), InsufficientBalance)
    assert isinstance(raised(raise_for_common_status, reply(401, {"detail": "Unauthenticated"})), AuthFailed)
    assert type(raised(raise_for_common_status, reply(429, {}))) is RateLimited


@pytest.mark.parametrize(("status", "body", "expected"), [
    (429, {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                     "param": None, "code": "insufficient_quota"}}, InsufficientBalance),
    (400, {"error": {"message": "Billing hard limit has been reached", "type": "invalid_request_error",
                     "param": None, "code": "billing_hard_limit_reached"}}, InsufficientBalance),
    (429, {"error": {"message": "Rate limit reached", "type": "requests", "param": None,
                     "code": "rate_limit_exceeded"}}, RateLimited),
    (401, {"error": {"message": "Incorrect API key provided: sk-abc***xyz.", "type": "invalid_request_error",
                     "param": None, "code": "invalid_api_key"}}, AuthFailed),
])
def test_sora(status, body, expected):
    assert type(raised(sora._raise_for_error, reply(status, body), creates=True)) is expected


@pytest.mark.parametrize(("status", "body", "expected"), [
    (429, {"code": 1102, "message": "Account balance not enough", "request_id": "r"}, InsufficientBalance),
    (400, {"code": 1102, "message": "Account balance not enough", "request_id": "r"}, InsufficientBalance),
    (429, {"code": 1101, "message": "Account is in arrears", "request_id": "r"}, InsufficientBalance),
    (401, {"code": 1002, "message": "Authorization invalid", "request_id": "r"}, AuthFailed),
    (429, {"code": 1303, "message": "parallel task over resource pack limit", "request_id": "r"}, RateLimited),
    (403, {"code": 1103, "message": "no access to this model", "request_id": "r"}, Rejected),
    # new-api gateway in front of Kling: quota used up is not a bad key.
    (403, {"code": "quota_not_enough", "message": "用户额度不足", "data": None}, InsufficientBalance),
    (403, {"error": {"message": "用户额度不足, 剩余额度: $0.01", "type": "new_api_error",
                     "code": "insufficient_user_quota"}}, InsufficientBalance),
    (401, {"error": {"message": "该令牌额度已用尽 TokenStatusExhausted[sk-abc***]", "type": "new_api_error",
                     "code": ""}}, InsufficientBalance),
    (401, {"error": {"message": "无效的令牌", "type": "new_api_error", "code": ""}}, AuthFailed),
    (429, {"code": "fail_to_fetch_task", "message": "当前分组上游负载已饱和，请稍后再试", "data": None}, RateLimited),
])
def test_kling_and_its_gateway(status, body, expected):
    error = raised(kling.raise_for_error, reply(status, body), body, creates=True)
    assert type(error) is expected, error


def test_suno_gateway_quota_and_key():
    quota = {"code": "quota_not_enough", "message": "quota not enough", "data": None}
    assert isinstance(raised(suno._gateway_data, reply(403, quota), creates=True), InsufficientBalance)
    bad_key = {"error": {"message": "无效的令牌", "type": "new_api_error", "code": ""}}
    assert isinstance(raised(suno._gateway_data, reply(401, bad_key), creates=True), AuthFailed)
    credits = {"code": 429, "msg": "The current credits are insufficient. Please top up.", "data": None}
    assert isinstance(raised(suno._sunoapi_data, reply(200, credits), creates=True), InsufficientBalance)


def test_fal_veo_runway():
    provider = fal.FalProvider(ProviderSettings(name="fal", base_url="https://queue.fal.run"))
    locked = reply(403, {"detail": "User is locked. Reason: Exhausted balance. Top up your balance at "
                                   "fal.ai/dashboard/billing."})
    assert isinstance(raised(provider._raise_refusal, locked), InsufficientBalance)
    assert isinstance(raised(provider._raise_refusal, reply(401, {"detail": "Unauthorized"})), AuthFailed)

    depleted = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
                          "message": "Your prepayment credits are depleted. Please go to AI Studio to manage "
                                     "your project and billing."}}
    assert isinstance(raised(veo._raise_for_error, reply(429, depleted), creates=True), InsufficientBalance)
    quota = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "Quota exceeded for metric",
                       "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "19s"}]}}
    limited = raised(veo._raise_for_error, reply(429, quota), creates=True)
    assert isinstance(limited, RateLimited) and limited.retry_after == 19
    invalid = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
    bad_key = {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "API key not valid.",
                         "details": [invalid]}}
    assert isinstance(raised(veo._raise_for_error, reply(400, bad_key), creates=True), AuthFailed)

    credits = reply(400, {"error": "You do not have enough credits to run this task."})
    assert isinstance(raised(runway._raise_for_status, credits, creates=True), InsufficientBalance)
    assert isinstance(raised(runway._raise_for_status, reply(401, {"error": "Invalid API key."}), creates=True),
                      AuthFailed)
