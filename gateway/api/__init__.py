"""The HTTP management API (FastAPI on uvicorn) over the operations layer.

* ``_app``: the routes and the application; the OpenAPI document.
* ``_auth``: the bearer tokens and their scopes, minted bot tokens, and where a
  request's token is checked.
* ``_guard``: what a request passes before a route reads it: size, token, media type,
  one caller's share, slow bodies.
* ``_service``: what one API process holds (the endpoint table, the indexes, the replay
  jobs, the idempotency keys), read-your-writes and the per-endpoint write lock.
* ``_idempotency``: ``Idempotency-Key``: a retry gets the first answer.
* ``_errors``: the error tree mapped to HTTP statuses; ``application/problem+json``.
* ``_models``: the request and response bodies (pydantic), the API's contract.
* ``_jobs``: replay jobs and their progress.
* ``_metrics``: each request counted under its route's template; ``/metrics``.
* ``_server``: serving it (``gateway api``, or on a thread of ``gateway up``) within its
  limits.

The modules are private: import from ``gateway.api``.
"""

from ._app import create_app, openapi_document
from ._auth import (
    DEFAULT_MINTED_TTL,
    MAX_MINTED_TTL,
    MIN_KEY_LENGTH,
    MIN_TOKEN_LENGTH,
    MINTED_PREFIX,
    TOKENS_ENV,
    Minted,
    Tokens,
    authenticate,
    is_loopback,
    require_token,
    tokens_for,
)
from ._errors import ANSWERS, PROBLEM_TYPE, PROBLEMS, api_field, problem
from ._guard import CALLER_CONCURRENCY, OPEN_PATHS, RequestGuard
from ._idempotency import IdempotencyKeys
from ._jobs import KEEP, MAX_ITEMS, MAX_REFUSALS, JobState, ReplayJob, ReplayJobs, SendReplay
from ._metrics import METRICS_PATH, UNMATCHED, RequestMetrics, route_template
from ._server import ApiThread, Listening, bind_address, protocol, serve, server, start_thread
from ._service import READY_CACHE_SECONDS, VISIBLE_TIMEOUT, ApiService, Check, NotVisibleYet

__all__ = [
    "ANSWERS",
    "CALLER_CONCURRENCY",
    "DEFAULT_MINTED_TTL",
    "KEEP",
    "MAX_ITEMS",
    "MAX_MINTED_TTL",
    "MAX_REFUSALS",
    "METRICS_PATH",
    "MINTED_PREFIX",
    "MIN_KEY_LENGTH",
    "MIN_TOKEN_LENGTH",
    "OPEN_PATHS",
    "PROBLEMS",
    "PROBLEM_TYPE",
    "READY_CACHE_SECONDS",
    "TOKENS_ENV",
    "UNMATCHED",
    "VISIBLE_TIMEOUT",
    "ApiService",
    "ApiThread",
    "Check",
    "IdempotencyKeys",
    "JobState",
    "Listening",
    "Minted",
    "NotVisibleYet",
    "ReplayJob",
    "ReplayJobs",
    "RequestGuard",
    "RequestMetrics",
    "SendReplay",
    "Tokens",
    "api_field",
    "authenticate",
    "bind_address",
    "create_app",
    "is_loopback",
    "openapi_document",
    "problem",
    "protocol",
    "require_token",
    "route_template",
    "serve",
    "server",
    "start_thread",
    "tokens_for",
]
