"""pytest's command-line options for the test suite (they must be known before tests/ is
collected, so they live at the root)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--brokers", default="tansu,kafka", metavar="NAMES",
        help="Brokers the integration tests run on: tansu (the bundled one), kafka (Apache Kafka "
             "from Maven Central's jars; needs Java 17+ and Maven), or both (the default).")
