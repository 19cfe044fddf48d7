"""The house's shape, checked: the SDK stays light, providers stay a leaf, Redis keys live in the store."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_importing_the_sdk_leaves_the_server_out() -> None:
    code = ("import sys, orchestrator.sdk.client, orchestrator.wire.signing; "
            "print(','.join(m for m in ('fastapi', 'arq', 'redis', 'boto3', 'starlette', 'providers', "
            "'orchestrator.domain', 'orchestrator.store', 'orchestrator.services') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == ""


def test_providers_never_import_the_orchestrator_or_workers() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "providers").rglob("*.py")
                 if re.search(r"^\s*(from|import) (orchestrator|workers)\b", p.read_text(), re.MULTILINE)]
    assert offenders == []


def test_redis_key_strings_appear_only_in_the_store() -> None:
    pattern = re.compile(r"""["']atl:""")
    offenders = [str(p.relative_to(ROOT)) for d in ("orchestrator", "workers") for p in (ROOT / d).rglob("*.py")
                 if pattern.search(p.read_text()) and "orchestrator/store/" not in p.as_posix()]
    assert offenders == []
