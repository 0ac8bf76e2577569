# The gateway image: `gateway run` by default; every `gateway` command works
# (`docker compose exec gateway gateway publish examples/events.jsonl`).
# confluent-kafka's wheels bundle librdkafka, so no compiler or system library is needed.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY avro/ avro/
COPY gateway/ gateway/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home gateway
WORKDIR /app
COPY examples/ examples/
USER gateway
# /metrics, /healthz, /readyz of worker 0; `--workers N` uses 9400 … 9400+N-1.
EXPOSE 9400
CMD ["gateway", "run"]
