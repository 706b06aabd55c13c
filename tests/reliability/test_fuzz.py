"""Fuzz the HTTP API from its own OpenAPI document (schemathesis): no undocumented 5xx, no crash, still ready.

A short run here; `make reliability` runs thousands of requests (bench/reliability.py).
"""

from __future__ import annotations

import pytest

from .scenarios import fuzz

EXAMPLES = 25  # per operation and mode: a few hundred requests in all


def assert_survived(server, result) -> None:
    assert result.transport_errors == [], result.transport_errors[:5]
    assert result.server_errors == [], result.server_errors[:5]
    assert result.spec_mismatches == [], result.spec_mismatches[:5]
    assert server.process.poll() is None, server.log()[-3000:]
    assert server.client.get("/v2/health/ready").status_code == 200
    assert "Exception in ASGI application" not in server.log()


def test_openapi_document_describes_every_route(serve, models):
    server = serve("--model-name", "mlp", "--model-uri", str(models / "mlp.pt"))
    document = server.client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.0")
    assert set(document["paths"]) >= {
        "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/ready",
        "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer", "/v1/models/{name}",
        "/v1/models/{name}:predict", "/metrics"}
    infer = document["paths"]["/v2/models/{name}/infer"]["post"]["responses"]
    assert {"200", "400", "404", "413", "500", "503", "504"} <= set(infer)
    assert "Retry-After" in infer["503"]["headers"]
    assert infer["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}


@pytest.mark.slow
def test_fuzzing_the_mlp_finds_no_server_error(serve, models):
    server = serve("--model-name", "mlp", "--model-uri", str(models / "mlp.pt"))
    result = fuzz(server.url, EXAMPLES)
    assert result.requests >= 250
    assert_survived(server, result)
    assert result.by_status[200] > 0 and result.by_status[400] > 0 and result.by_status[404] > 0


@pytest.mark.slow
def test_fuzzing_a_python_handler_finds_no_server_error(serve):
    server = serve("--model-name", "doubler", "--format", "python", "--handler", "handlers:Doubler")
    result = fuzz(server.url, EXAMPLES // 2, seed=1)
    assert result.requests >= 120
    assert_survived(server, result)
