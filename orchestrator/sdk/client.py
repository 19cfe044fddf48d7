"""The Python client's earlier import path. The client is now a package of its own, ``atelier_client``
(``clients/python/``, installable alone); this module re-exports it so that code written against
``orchestrator.sdk.client`` keeps working. New code imports ``atelier_client``."""

from atelier_client import *  # noqa: F403
from atelier_client import __all__  # noqa: F401
