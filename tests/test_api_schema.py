"""Property-based tests of the management API from its own OpenAPI document
(schemathesis): on every route, generated requests (valid ones, and invalid ones) never
get a 500, and every answer conforms to the document (status, content type, schema).

The API runs in process over a real broker, with its own topics per route."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.api import ApiService, ApiThread, Tokens, bind_address
from gateway.config import Config

# The API's contract with its own document does not depend on the broker; the routes'
# work on Apache Kafka is shown by tests/test_api.py, which runs on both.
pytestmark = [pytest.mark.integration, pytest.mark.brokers("tansu")]

TOKEN = "schema-token-" + "z" * 24
DOCUMENT = json.loads((Path(__file__).resolve().parents[1] / "openapi.json").read_text())
EXAMPLES = int(os.environ.get("GATEWAY_TEST_API_EXAMPLES", "10"))  # per route; more by the variable


# Loaded from the committed document (test_api.py checks it is the served one).
schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture
def api_url(topics: Config) -> Iterator[str]:
    """The API served over HTTP (uvicorn on a thread, as `gateway up` runs it), with
    its own topics."""
    service = ApiService(topics, Tokens([TOKEN])).start()
    api = ApiThread(service, bind_address("127.0.0.1", 0)).start()
    try:
        yield f"http://127.0.0.1:{api.sock.getsockname()[1]}"
    finally:
        api.stop()


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_route_fails_or_breaks_its_document(case: Any, api_url: str) -> None:
    response = case.call_and_validate(
        base_url=api_url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        checks=[status_code_conformance, content_type_conformance, response_headers_conformance,
                response_schema_conformance],
    )
    assert response.status_code < 500 or response.status_code in (503, 504), response.text
