"""The HTTP server, driven over real HTTP on loopback (uvicorn in a thread, httpx) with stories260k."""

import asyncio
import json

import httpx
import pytest
import torch

from rap.serve.engine import Engine
from rap.serve.server import ServerThread, create_app

BIG = 1 << 40


@pytest.fixture(scope="module")
def server():
    from rap.sources import load_view

    view, tok = load_view("stories260k", dtype=torch.float32, device="cpu")
    engine = Engine(view, tokenizer=tok, budget=BIG)
    app = create_app(engine, batch_window_s=0.05)
    with ServerThread(app) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, engine


def complete(client, **body):
    return client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, **body})


def sse_events(client, path, body):
    events = []
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_completion_returns_text_usage_and_decision_metadata(server):
    client, _ = server
    r = complete(client)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "stories260k"
    choice = body["choices"][0]
    assert choice["text"].startswith(", there was") and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}
    meta = body["rap"]
    assert meta["decision"]["mask"] == "dense" and meta["predicted_peak_bytes"] <= meta["budget_bytes"]
    assert meta["resident_bytes"] > 0 and meta["seconds"] > 0


def test_chat_completion_returns_an_assistant_message(server):
    client, _ = server
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Tell me a story."}],
                                                   "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant" and body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] == 8


def test_streamed_completion_concatenates_to_the_plain_one(server):
    client, _ = server
    plain = complete(client, max_tokens=20).json()["choices"][0]["text"]
    chunks = sse_events(client, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0,
                                                    "stream": True, "stream_options": {"include_usage": True}})
    text_chunks = [c for c in chunks if c["choices"]]
    assert len(text_chunks) > 5  # token by token, not one blob
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == plain
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 20


def test_streamed_chat_starts_with_the_role_and_ends_with_a_finish_reason(server):
    client, _ = server
    chunks = sse_events(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                         "max_tokens": 6, "temperature": 0, "stream": True})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


def test_models_lists_the_served_model(server):
    client, _ = server
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["stories260k"] and data[0]["max_context"] == 512


def test_budget_put_changes_the_next_decision_and_get_reports_it(server):
    client, engine = server
    info = client.get("/v1/budget").json()
    assert info["budget_bytes"] == BIG and info["dense_need_bytes"] > info["smallest_need_bytes"] > 0
    try:
        r = client.put("/v1/budget", json={"budget": int(0.6 * info["dense_need_bytes"])})
        assert r.status_code == 200 and r.json()["source"]["kind"] == "fixed"
        meta = complete(client).json()["rap"]
        # the default policy loses precision before it drops blocks: either way the decision is not dense
        assert meta["decision"]["mask"] != "dense" and meta["predicted_peak_bytes"] <= meta["budget_bytes"]
        assert client.get("/v1/budget").json()["resident_bytes"] < info["dense_param_bytes"]
        bad = client.put("/v1/budget", json={"budget": "lots"})
        assert bad.status_code == 400 and "budget" in bad.json()["error"]["message"]
        assert client.put("/v1/budget", json={"budget": "1GiB", "extra": 1}).status_code == 400
    finally:
        client.put("/v1/budget", json={"budget": BIG})
    assert complete(client).json()["rap"]["decision"]["mask"] == "dense"


BAD_REQUESTS = [
    ("malformed JSON", '{"prompt": "Once', 400),
    ("not an object", "[1, 2, 3]", 400),
    ("unknown field", json.dumps({"prompt": "Hi", "max_tokens": 4, "best_of": 3}), 400),
    ("empty prompt", json.dumps({"prompt": "", "max_tokens": 4}), 400),
    ("token id outside the vocabulary", json.dumps({"prompt": [1, 10**6], "max_tokens": 4}), 400),
    ("a boolean token id", json.dumps({"prompt": [[1, True]], "max_tokens": 4}), 400),
    ("negative max_tokens", json.dumps({"prompt": "Hi", "max_tokens": -3}), 400),
    ("too long prompt", json.dumps({"prompt": "the cat sat " * 300, "max_tokens": 4}), 400),
    ("wrong type", json.dumps({"prompt": "Hi", "max_tokens": "many"}), 400),
    ("n over the limit", json.dumps({"prompt": "Hi", "n": 129}), 400),
    ("huge seed", json.dumps({"prompt": "Hi", "seed": 18446744073709551616}), 400),
    ("lone surrogate", '{"prompt": "\\ud800 hi", "max_tokens": 4}', 400),
    ("presence penalty", json.dumps({"prompt": "Hi", "presence_penalty": 0.5}), 400),
    ("unknown model", json.dumps({"prompt": "Hi", "model": "gpt-9"}), 404),
]


@pytest.mark.parametrize("name,body,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_json_errors_and_the_server_keeps_serving(server, name, body, status):
    client, _ = server
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert r.json()["error"]["message"]
    assert complete(client, max_tokens=2).status_code == 200


def test_bad_chat_requests_get_4xx(server):
    client, _ = server
    for body, status in (({"messages": []}, 400), ({"messages": [{"role": "user", "content": None}]}, 400),
                         ({"messages": [{"role": "robot", "content": "hi"}]}, 400),
                         ({"messages": [{"role": "tool", "content": "hi"}]}, 400),
                         ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400),
                         ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400)):
        assert client.post("/v1/chat/completions", json=body).status_code == status


def test_requests_arriving_together_are_batched(server):
    client, _ = server

    async def burst():
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=60) as ac:
            return await asyncio.gather(*(ac.post("/v1/completions", json={"prompt": p, "max_tokens": 8,
                                                                           "temperature": 0})
                                          for p in ["Once upon a time", "The dog", "Lily saw", "A big"] * 2))

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    assert max(r.json()["rap"]["batch"] for r in responses) > 1


def test_request_over_the_budget_gets_503_and_the_next_one_is_served(server):
    client, engine = server
    try:
        client.put("/v1/budget", json={"budget": 1000})
        r = complete(client)
        assert r.status_code == 503 and r.json()["error"]["code"] == "budget_exceeded"
        stream = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "stream": True})
        assert stream.status_code == 503
    finally:
        client.put("/v1/budget", json={"budget": BIG})
    assert complete(client).status_code == 200


def test_metrics_expose_decisions_memory_throughput_and_rejections(server):
    client, _ = server
    complete(client)
    text = client.get("/metrics").text
    for name in ("rap_decisions_total", "rap_budget_bytes", "rap_resident_bytes", "rap_tokens_per_second",
                 "rap_requests_rejected_total", "rap_generated_tokens_total", "rap_http_requests_total",
                 "rap_batch_size_bucket", "rap_predicted_peak_bytes"):
        assert name in text, name
    assert 'rap_decisions_total{dropped_blocks="0",kv_ratio="1"}' in text
