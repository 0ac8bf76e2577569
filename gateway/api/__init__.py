"""The HTTP management API (FastAPI on uvicorn) over the operations layer.

* ``_app``: the routes and the application; the OpenAPI document.
* ``_auth``: the bearer tokens, and where a request's token is checked.
* ``_service``: what one API process holds (the endpoint table, the history index, the
  replay jobs) and read-your-writes.
* ``_errors``: the error tree mapped to HTTP statuses, and the JSON error body.
* ``_models``: the request and response bodies (pydantic), the API's contract.
* ``_jobs``: replay jobs and their progress.
* ``_server``: serving it: ``gateway api``, or on a thread of ``gateway up``.

The modules are private: import from ``gateway.api``.
"""

from ._app import create_app, openapi_document
from ._auth import MIN_TOKEN_LENGTH, TOKENS_ENV, Tokens, is_loopback, require_token, tokens_for
from ._errors import ANSWERS, api_field
from ._jobs import KEEP, MAX_ITEMS, MAX_REFUSALS, JobState, ReplayJob, ReplayJobs, SendReplay
from ._server import ApiThread, Listening, bind_address, serve, server, start_thread
from ._service import VISIBLE_TIMEOUT, ApiService

__all__ = [
    "ANSWERS",
    "KEEP",
    "MAX_ITEMS",
    "MAX_REFUSALS",
    "MIN_TOKEN_LENGTH",
    "TOKENS_ENV",
    "VISIBLE_TIMEOUT",
    "ApiService",
    "ApiThread",
    "JobState",
    "Listening",
    "ReplayJob",
    "ReplayJobs",
    "SendReplay",
    "Tokens",
    "api_field",
    "bind_address",
    "create_app",
    "is_loopback",
    "openapi_document",
    "require_token",
    "serve",
    "server",
    "start_thread",
    "tokens_for",
]
