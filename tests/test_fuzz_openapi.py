"""Fuzzing the HTTP API from its own OpenAPI schema with schemathesis: every operation of
`create_openai_app` (over an in-process LocalCluster on a tiny random-weight model with
max_model_len 64) gets schema-valid and schema-breaking requests; none may get a 5xx, and
every 4xx must be OpenAI's error JSON. Bounded for CI: a fixed number of examples per
operation, derandomized, so a run takes the same cases (and well under 3 minutes)."""
from __future__ import annotations

import asyncio
from typing import Optional

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode

from raylm.cluster.local import LocalCluster
from raylm.cluster.openai_api import create_openai_app
from raylm.engine.config import EngineArgs

MAX_EXAMPLES = 50  # per operation and generation mode


@pytest.fixture(scope="module")
def cluster(llama_dir):
    s = LocalCluster(EngineArgs(model=llama_dir, dtype="float32", max_model_len=64, block_size=8,
                                max_num_seqs=16, max_logprobs=5), served_model_name="tiny")
    yield s
    asyncio.run(s.shutdown())
    assert not s.open_request_ids


@pytest.fixture(scope="module")
def api_schema(cluster):
    # schemathesis serves each request on its own event-loop thread; the cluster's frontend
    # binds to that loop at its first request, and every later one runs there too.
    app = create_openai_app(cluster, max_n=4, max_prompts_per_request=8, max_seqs_per_request=16)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def check_response(response) -> None:
    """No 5xx; a 4xx is OpenAI's error JSON with its own status as the code."""
    assert response.status_code < 500, response.text[:2000]
    if response.status_code >= 400:
        content_type = (response.headers.get("content-type") or [""])[0]  # schemathesis: lists of values
        assert content_type.startswith("application/json"), response.text[:500]
        body = response.json()
        assert set(body) == {"error"}, body
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert err["code"] == response.status_code and isinstance(err["message"], str) and err["message"]
        assert isinstance(err["type"], str) and err["type"].endswith("Error")


def declared_fields(schema) -> dict[str, set]:
    """{operation label: the JSON body fields its schema declares}."""
    spec, out = schema.raw_schema, {}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            ref = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if "$ref" in ref:
                model = spec["components"]["schemas"][ref["$ref"].split("/")[-1]]
                out[f"{method.upper()} {path}"] = set(model["properties"])
    return out


def fuzz(operation, mode: GenerationMode, keep: Optional[set] = None) -> None:
    """MAX_EXAMPLES requests of `mode` to one operation, each checked (shrunk on failure).
    With `keep`, bodies hold only those fields (and no model name): random undeclared
    fields and models would stop most requests at the first check."""
    strategy = operation.as_strategy(generation_mode=mode)
    if keep is not None:
        strategy = strategy.map(lambda case: _only(case, keep))

    @hypothesis.given(case=strategy)
    @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    def run(case):
        response = case.call(timeout=60)
        try:
            check_response(response)
        except AssertionError as exc:
            raise AssertionError(f"{case.as_curl_command()}\n{exc}") from None

    run()


def _only(case, keep: set):
    if isinstance(case.body, dict):
        case.body = {k: v for k, v in case.body.items() if k in keep and k != "model"}
    return case


MODES = {"valid": (GenerationMode.POSITIVE, False), "valid-declared": (GenerationMode.POSITIVE, True),
         "invalid": (GenerationMode.NEGATIVE, False)}


@pytest.mark.parametrize("mode", list(MODES))
def test_no_5xx_and_every_4xx_in_openai_shape(api_schema, mode):
    # (schemathesis' pytest plugin does not run under this pytest; its Python API does)
    generation, declared_only = MODES[mode]
    declared = declared_fields(api_schema)
    failures, labels = [], []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if generation == GenerationMode.NEGATIVE and not operation.body:
            continue  # no parameters and no body: nothing to break
        if declared_only and operation.label not in declared:
            continue  # no JSON body: the plain run covers it
        labels.append(operation.label)
        try:
            fuzz(operation, generation, declared.get(operation.label) if declared_only else None)
        except AssertionError as exc:
            failures.append(f"{operation.label}: {exc}")
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize"} <= set(labels)
    assert not failures, "\n\n".join(failures)
