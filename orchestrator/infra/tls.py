"""One TLS context per process for the outgoing HTTP clients.

Building a context loads the CA bundle (about 20 ms of CPU); the API and the worker each make a
client per provider, so with twenty providers a process start spent about a second on it. A
context is safe to share between clients, and every one of ours verifies the same way.
"""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def client_ssl_context(trust_env: bool = True) -> ssl.SSLContext:
    """httpx's default verifying context (``trust_env``: honour ``SSL_CERT_FILE``/``SSL_CERT_DIR``)."""
    return httpx.create_ssl_context(trust_env=trust_env)
