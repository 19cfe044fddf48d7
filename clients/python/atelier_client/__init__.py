"""Atelier's Python client: submit media generation jobs, follow them, fetch their outputs.

Usage::

    from atelier_client import Client

    with Client("http://127.0.0.1:8000", api_key="atl_...") as atelier:   # or ATELIER_URL / ATELIER_API_KEY
        photo = atelier.upload("portrait.png")                         # a local input, stored by Atelier
        job = atelier.run({"provider": "bfl", "kind": "image", "model": "flux-kontext-pro",
                           "input": {"prompt": "as a watercolour", "image_url": photo.url}},
                          on_update=lambda update: print(update.status), timeout=600)
        if job.status == "succeeded":
            atelier.download_outputs(job, "out/")                       # streamed, sha256 checked

``AsyncClient`` has the same methods, awaited. A webhook receiver checks what Atelier sent with
``verify_webhook(secret, headers, body)``, which returns a typed event.
"""

from atelier_client.client import AsyncClient, BatchEvent, Client, JobUpdate, UploadSource, extension
from atelier_client.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AtelierError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    DownloadError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    StreamError,
    UnsupportedMediaTypeError,
    WaitTimeoutError,
    WebhookVerificationError,
)
from atelier_client.webhooks import verify_webhook
from atelier_client.wire.batches import BatchCreated, BatchItem, BatchView
from atelier_client.wire.events import BatchWebhookEvent, JobWebhookEvent, OtherWebhookEvent, WebhookEvent
from atelier_client.wire.jobs import (
    JobEvent,
    JobInput,
    JobKind,
    JobPage,
    JobQueryResult,
    JobRequest,
    JobStatus,
    JobView,
    OutputView,
    Priority,
    SourceRef,
)
from atelier_client.wire.models import ModelList, ModelView
from atelier_client.wire.uploads import UploadView
from atelier_client.wire.webhooks import (
    DeliveryPage,
    DeliveryView,
    EndpointCreated,
    EndpointPage,
    EndpointSecret,
    EndpointUpdate,
    EndpointView,
    Recovery,
)

__version__ = "0.1.0"

__all__ = [
    "Client", "AsyncClient", "verify_webhook", "BatchEvent", "JobUpdate", "UploadSource", "extension",
    "AtelierError", "APIConnectionError", "APITimeoutError", "APIError", "BadRequestError",
    "AuthenticationError", "PermissionDeniedError", "NotFoundError", "ConflictError", "PayloadTooLargeError",
    "UnsupportedMediaTypeError", "InvalidRequestError", "RateLimitError", "ServerError", "StreamError",
    "WaitTimeoutError", "DownloadError", "WebhookVerificationError",
    "JobRequest", "JobInput", "JobKind", "Priority", "SourceRef", "BatchItem", "JobView", "JobEvent", "JobPage",
    "JobQueryResult", "BatchCreated", "BatchView", "OutputView", "JobStatus", "UploadView", "ModelList",
    "ModelView", "EndpointCreated", "EndpointView", "EndpointPage", "EndpointUpdate", "EndpointSecret",
    "DeliveryView", "DeliveryPage", "Recovery",
    "WebhookEvent", "JobWebhookEvent", "BatchWebhookEvent", "OtherWebhookEvent",
]
