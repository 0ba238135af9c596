"""The served OpenAPI schema: every route is in it with its models, and schemathesis, fuzzing the
live server on 127.0.0.1 from that schema, finds no 5xx and no error body of the wrong shape.

The fuzzing is bounded (a fixed number of derandomized examples per operation and mode, no
shrinking, no example database on disk); generated requests get small token budgets so the tiny
model answers fast (`_cap_cost`), without turning a bad value into a good one.
"""

import time
from collections import Counter

import httpx
import pytest
import schemathesis
from conftest import serve_in_thread
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from minivllm.openai import OpenAIServing
from minivllm.server.app import create_app
from minivllm.worker import WorkerConfig, make_handler

MODEL = "tiny-test"
EXAMPLES = 15  # per operation and generation mode
OPENAI_ROUTES = [("post", "/chat/completions"), ("post", "/completions"), ("post", "/responses"),
                 ("post", "/messages"), ("post", "/messages/count_tokens"),
                 ("get", "/models"), ("get", "/models/{model}"), ("get", "/responses/{response_id}"),
                 ("delete", "/responses/{response_id}"), ("post", "/responses/{response_id}/cancel")]
OTHER_ROUTES = [("get", "/health"), ("get", "/ready"), ("get", "/metrics"), ("post", "/run"), ("post", "/runsync"),
                ("get", "/stream/{job_id}"), ("post", "/stream/{job_id}"), ("get", "/status/{job_id}"),
                ("post", "/status/{job_id}"), ("post", "/cancel/{job_id}")]


@pytest.fixture(scope="module")
def url(engine):
    serving = OpenAIServing(engine, MODEL, max_model_len=engine.engine.max_model_len)
    handler = make_handler(engine, serving, WorkerConfig(stream_flush_ms=0))
    with serve_in_thread(create_app(engine, serving, runpod_handler=handler)) as url:
        deadline = time.monotonic() + 30
        while httpx.get(url + "/ready").status_code != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.05)
        yield url


def test_schema_lists_every_route(url):
    schema = httpx.get(url + "/openapi.json").json()
    components = schema["components"]["schemas"]
    expected = [(m, p + r) for p in ("/v1", "/openai/v1") for m, r in OPENAI_ROUTES] + OTHER_ROUTES
    for method, path in expected:
        operation = schema["paths"][path][method]
        for status, response in operation["responses"].items():
            assert status != "422", (method, path)  # the app answers 400 with an error body instead
            for media in response.get("content", {}).values():
                assert_refs_resolve(media, components)
        if method == "post" and not path.startswith(("/cancel/", "/status/", "/stream/")) \
                and not path.endswith("/cancel"):
            body = operation["requestBody"]["content"]["application/json"]["schema"]
            assert_refs_resolve(body, components)
    assert {(m, p) for p, ops in schema["paths"].items() for m in ops} == set(expected)
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"}
    assert "messages" in components["ChatCompletionRequest"]["required"]
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"}
    assert httpx.get(url + "/docs").status_code == 200


def test_path_parameters_reach_dispatch_whole(url):
    """A decoded '?', an end's whitespace or '/' is part of the id (dispatch would cut or strip it)."""
    for method, path in [("POST", "/v1/responses/a%3Fb/cancel"), ("DELETE", "/v1/responses/a%3Fb"),
                         ("GET", "/v1/responses/%20"), ("GET", "/v1/models/%0A"), ("GET", "/v1/models/%2F"),
                         ("GET", f"/v1/models/{MODEL}%3Fx")]:
        r = httpx.request(method, url + path)
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text

def test_off_schema_requests_still_get_dispatch_errors(url):
    r = httpx.get(url + "/openai/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url", r.text
    r = httpx.get(url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed", r.text
    r = httpx.get(url + "/v1/messages")
    assert r.status_code == 405 and r.json()["type"] == "error", r.text  # Anthropic's shape there
    assert httpx.get(url + "/v1/models/").json()["object"] == "list"  # dispatch ignores a trailing slash


def assert_refs_resolve(node, components) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if ref is not None:
            assert ref.startswith("#/components/schemas/") and ref.split("/")[-1] in components, ref
        for child in node.values():
            assert_refs_resolve(child, components)
    elif isinstance(node, list):
        for child in node:
            assert_refs_resolve(child, components)


def _cap_cost(case) -> None:
    """Small token budgets: a missing one is set, a valid large one lowered, an invalid one kept."""
    body = case.body
    if not isinstance(body, dict) or case.method != "POST":
        return
    if case.path.endswith("/count_tokens"):
        return
    budget = "max_output_tokens" if case.path.endswith("/responses") else "max_tokens"
    if body.get(budget) is None and body.get("max_completion_tokens") is None:
        body[budget] = 4
    for key, cap, limit in (("max_tokens", 4, 1024), ("max_completion_tokens", 4, 1024),
                            ("max_output_tokens", 4, 1024), ("n", 2, 128), ("best_of", 2, 128)):
        if type(body.get(key)) is int and cap < body[key] <= limit:
            body[key] = cap


def _error_shape_problem(path: str, response) -> str | None:
    """None if a 4xx body is the route's error shape: Anthropic's on the Messages routes, OpenAI's on
    the other /v1 routes, RunPod's elsewhere."""
    try:
        body = response.json()
    except ValueError:
        return "not JSON"
    error = body.get("error") if isinstance(body, dict) else None
    if path.endswith(("/v1/messages", "/v1/messages/count_tokens")):
        if not (body.get("type") == "error" and isinstance(error, dict) and set(error) == {"type", "message"}
                and isinstance(error["message"], str) and error["message"]):
            return f"not an Anthropic error body: {body!r:.300}"
    elif path.startswith(("/v1/", "/openai/v1/")):
        if not (isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
                and isinstance(error["message"], str) and error["message"]):
            return f"not an OpenAI error body: {body!r:.300}"
    elif not (isinstance(error, str) and error):
        return f"not a RunPod error body: {body!r:.300}"
    return None


def test_schemathesis_finds_no_server_errors(url):
    served = httpx.get(url + "/openapi.json").json()
    for name in ("ChatCompletionRequest", "CompletionRequest", "ResponsesRequest", "MessagesRequest",
                 "CountTokensRequest"):
        # Positive bodies name our model, so they get past the model check to the engine.
        served["components"]["schemas"][name]["properties"]["model"] = {"const": MODEL}
    # ... and chat messages that render, so some reach the engine (any object is a valid message).
    served["components"]["schemas"]["ChatCompletionRequest"]["properties"]["messages"]["items"] = {
        "type": "object", "required": ["role", "content"],
        "properties": {"role": {"enum": ["system", "developer", "user", "assistant"]}, "content": {"type": "string"}}}
    schema = schemathesis.openapi.from_dict(served)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    statuses: dict[str, Counter] = {}
    failures: list[str] = []
    unnegatable: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        seen = statuses.setdefault(operation.label, Counter())
        modes = [schemathesis.GenerationMode.POSITIVE]
        if operation.body or list(operation.iter_parameters()):  # else nothing to make invalid
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:

            @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(mode))
            def fuzz(case) -> None:
                _cap_cost(case)
                response = case.call(base_url=url, timeout=60)
                seen[response.status_code] += 1
                what = f"{case.method} {case.formatted_path} body={case.body!r:.200} -> {response.status_code}"
                if 400 <= response.status_code < 500:
                    problem = _error_shape_problem(case.formatted_path, response)
                    if problem:
                        failures.append(f"{what}: {problem}")
                try:
                    case.validate_response(response, checks=checks)
                except schemathesis.errors.FailureGroup as e:  # record, keep fuzzing
                    failures.append(f"{what}: {str(e)[:600]}")

            try:
                fuzz()
            except Unsatisfiable:  # a string path parameter has no invalid value
                assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label
                unnegatable.append(operation.label)
    total = sum(sum(c.values()) for c in statuses.values())
    print(f"schemathesis: {len(statuses)} operations, {total} requests, statuses "
          f"{dict(sum(statuses.values(), Counter()))}; no negative examples for {unnegatable}")
    assert len(statuses) == 2 * len(OPENAI_ROUTES) + len(OTHER_ROUTES)
    assert not failures, "\n".join(failures)
