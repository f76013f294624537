"""rap on Ray Serve (rap.serve.cluster): the budget split rule and metrics relabelling on their own, then a local Ray
with 2 replicas of stories260k driven over loopback HTTP: both answer, a cluster budget reaches both, a killed
replica comes back while the cluster keeps answering.

The Ray tests share one module-scoped cluster (its start-up is most of their time) and are marked `cluster`."""

import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest

from conftest import run_rap

ray_serve = pytest.importorskip("ray.serve", reason="the cluster extra: pip install 'rap-runtime[cluster]'")

from rap.serve.cluster import DeployConfig, ReplicaConfig, assign_budgets, relabel_metrics  # noqa: E402
from rap.errors import RapError, RequestError  # noqa: E402

MiB = 1 << 20


# ==== the rules, without Ray ======================================================================
def test_a_byte_total_is_split_equally_and_capped_at_each_device():
    assert assign_budgets("100MiB", {0: 1 << 40, 1: 1 << 40}) == {0: 50 * MiB, 1: 50 * MiB}
    assert assign_budgets("1TiB", {0: 8 << 30, 1: 16 << 30}) == {0: 8 << 30, 1: 16 << 30}


def test_device_split_is_proportional_to_device_memory():
    shares = assign_budgets("90GiB", {0: 40 << 30, 1: 80 << 30, 2: 80 << 30}, split="device")
    assert shares == {0: 18 << 30, 1: 36 << 30, 2: 36 << 30}


def test_relative_budgets_apply_to_every_replica_and_overrides_win():
    assert assign_budgets("live:1GiB", {0: 1, 1: 1}) == {0: "live:1GiB", 1: "live:1GiB"}
    assert assign_budgets("50%", {3: 1 << 30}) == {3: "50%"}
    assert assign_budgets("64MiB", {0: 1 << 40, 1: 1 << 40}, overrides={1: "8MiB", 7: "1MiB"}) == \
        {0: 32 * MiB, 1: "8MiB"}
    with pytest.raises(RequestError):
        assign_budgets("lots", {0: 1})


def test_metrics_of_replicas_merge_into_one_exposition_labelled_by_replica():
    a = "# HELP rap_x_total x\n# TYPE rap_x_total counter\nrap_x_total 3.0\n" \
        "# HELP rap_g g\n# TYPE rap_g gauge\nrap_g{kind=\"a\"} 1.5\n"
    b = "# HELP rap_x_total x\n# TYPE rap_x_total counter\nrap_x_total 4.0\n"
    text = relabel_metrics([(0, a), (1, b)])
    assert 'rap_x_total{replica="0"} 3.0' in text and 'rap_x_total{replica="1"} 4.0' in text
    assert 'rap_g{kind="a",replica="0"} 1.5' in text
    assert text.count("# TYPE rap_x_total counter") == 1


def test_autoscaling_flags_become_a_ray_serve_autoscaling_config():
    assert DeployConfig(replicas=2).autoscaling is None
    config = DeployConfig(replicas=2, min_replicas=1, max_replicas=4, target_ongoing_requests=8).autoscaling
    assert config == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2, "target_ongoing_requests": 8}
    with pytest.raises(RapError, match="max-replicas"):
        DeployConfig(min_replicas=3, max_replicas=2).autoscaling


def test_cluster_command_without_the_extra_says_how_to_install_it(monkeypatch):
    import sys

    import rap

    monkeypatch.delitem(sys.modules, "rap.serve.cluster", raising=False)
    monkeypatch.delattr(rap, "cluster", raising=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as without the extra
    result = run_rap("cluster", "stories260k")
    assert result.returncode == 2
    assert "pip install 'rap-runtime[cluster]'" in result.stderr and "Traceback" not in result.stderr


def test_cluster_command_refuses_bad_options_before_starting_ray():
    for args, words in ((["--replicas", "0"], "--replicas"), (["--split", "even"], "--split"),
                        (["--min-replicas", "3", "--max-replicas", "2"], "--max-replicas"),
                        (["--budget", "lots"], "budget")):
        result = run_rap("cluster", "stories260k", *args)
        assert result.returncode == 2 and words in result.stderr, (args, result.stderr)


# ==== a local Ray, 2 replicas ======================================================================
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    from rap.serve.cluster import start_cluster, stop_cluster

    url = start_cluster(ReplicaConfig("stories260k", budget="1TiB", threads=1, batch_window_s=0.02),
                        DeployConfig(replicas=2, retries=3), port=_free_port(), log_to_driver=False)
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client
    finally:
        stop_cluster()


def complete(client, **body):
    return client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
                                                **body})


def listing(client) -> dict:
    return client.get("/v1/budget").json()


@pytest.mark.cluster
def test_both_replicas_answer_the_same_openai_routes(cluster):
    seen = {}
    for _ in range(24):
        r = complete(cluster)
        assert r.status_code == 200
        seen[r.headers["x-rap-replica"]] = r.json()["choices"][0]["text"]
    assert set(seen) == {"0", "1"}
    assert len(set(seen.values())) == 1  # greedy: the same text from either replica
    chat = cluster.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 4})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    assert cluster.get("/v1/models").json()["data"][0]["id"] == "stories260k"


@pytest.mark.cluster
def test_streaming_through_the_cluster_concatenates_to_the_plain_completion(cluster):
    plain = complete(cluster, max_tokens=16).json()["choices"][0]["text"]
    events = []
    with cluster.stream("POST", "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 16,
                                                         "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 5 and "".join(c["choices"][0]["text"] for c in chunks) == plain


@pytest.mark.cluster
def test_bad_input_still_gets_4xx_json_from_the_cluster(cluster):
    bad = cluster.post("/v1/completions", content='{"prompt": "Once', headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert complete(cluster, best_of=2).status_code == 400  # schema errors are 400, as OpenAI answers
    assert complete(cluster, model="gpt-9").status_code == 404
    assert cluster.put("/v1/budget", json={"budget": "lots"}).status_code == 400
    assert cluster.put("/v1/budget", json={"budget": "1GiB", "replica": 9}).status_code == 400
    assert cluster.put("/v1/budget", json={"budget": "1GiB", "extra": 1}).status_code == 400


@pytest.mark.cluster
def test_a_cluster_budget_is_split_over_both_replicas_and_one_replica_can_be_set(cluster):
    before = listing(cluster)["replicas"]
    share = int(0.6 * before[0]["dense_need_bytes"])
    try:
        r = cluster.put("/v1/budget", json={"budget": 2 * share})
        assert r.status_code == 200 and r.json()["pending_replicas"] == []
        rows = r.json()["replicas"]
        assert [row["budget_bytes"] for row in rows] == [share, share]
        answered = {}
        for _ in range(24):
            body = complete(cluster)
            assert body.status_code == 200
            answered[body.headers["x-rap-replica"]] = body.json()["rap"]
        assert set(answered) == {"0", "1"}
        for meta in answered.values():  # both replicas plan inside their share: blocks dropped
            assert meta["budget_bytes"] == share and meta["decision"]["mask"] != "dense"  # quantized or dropped
        rows = listing(cluster)["replicas"]
        assert all(row["resident_bytes"] < before[0]["resident_bytes"] and row["last_decision"]["mask"] != "dense"
                   for row in rows)
        one = cluster.put("/v1/budget", json={"budget": "3MiB", "replica": 1}).json()
        assert [row["budget_bytes"] for row in one["replicas"]] == [share, 3 * MiB]
    finally:
        cluster.put("/v1/budget", json={"budget": "1TiB"})
    text = cluster.get("/metrics").text
    assert 'rap_budget_bytes{replica="0"}' in text and 'rap_budget_bytes{replica="1"}' in text
    assert "rap_cluster_retries_total" in text


@pytest.mark.cluster
def test_a_killed_replica_is_restarted_and_the_cluster_answers_throughout(cluster):
    share = 40 * MiB
    cluster.put("/v1/budget", json={"budget": 2 * share})
    before = rows = listing(cluster)["replicas"]
    victim = rows[0]
    statuses: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def traffic():
        with httpx.Client(base_url=str(cluster.base_url), timeout=120) as client:
            while not stop.is_set():
                r = complete(client, max_tokens=16)
                code = r.json().get("error", {}).get("code") if r.status_code != 200 else None
                statuses.append((r.status_code, code))

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        os.kill(victim["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            rows = listing(cluster)["replicas"]
            # the replacement is listed from its first report, then acknowledges the budget the board answered
            if len(rows) == 2 and victim["pid"] not in [row["pid"] for row in rows] and all(
                    row["applied_version"] for row in rows):
                break
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
        cluster.put("/v1/budget", json={"budget": "1TiB"})
    assert len(rows) == 2 and victim["pid"] not in [row["pid"] for row in rows], "no replacement replica"
    survivor_id = next(row["replica_id"] for row in before if row["replica_id"] != victim["replica_id"])
    (replacement,) = [row for row in rows if row["replica_id"] not in (victim["replica_id"], survivor_id)]
    assert replacement["budget_bytes"] == share  # the new replica picked up the cluster budget
    ok = [s for s, _ in statuses if s == 200]
    others = [(s, c) for s, c in statuses if s != 200]
    assert all(s == 503 and c == "replica_unavailable" for s, c in others), others  # never a bare 500
    assert len(ok) > 10  # the surviving replica kept answering while the other restarted
