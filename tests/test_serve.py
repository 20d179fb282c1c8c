"""`opendit serve` on the digits model with 2 worker processes: concurrent requests (batched) equal `opendit sample`,
the OpenAI images client, bad input and API keys, metrics. One server for the module (it loads once)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

import opendit
from serve_utils import cli_images, decode_png, running_server

pytestmark = pytest.mark.slow
KEY = "test-key-123"


@pytest.fixture(scope="module")
def server():
    with running_server("--nproc", "2", "--max-batch", "8", api_key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def reference():
    """One in-process engine: each request's images as one process makes them (exact strategies: equal)."""
    with opendit.Engine(nproc=1) as engine:
        yield lambda classes, seed, steps: engine.generate(classes=classes, seed=seed, steps=steps).images


def concurrent_requests(count: int = 12) -> list[dict]:
    """`count` requests in two step settings (so some batch together and some cannot), other classes and seeds."""
    rng = np.random.default_rng(7)
    return [
        {"classes": [int(c) for c in rng.integers(0, 10, size=int(rng.integers(1, 4)))], "seed": 100 + 3 * i,
         "steps": (6, 9)[i % 2]}
        for i in range(count)
    ]  # fmt: skip


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def test_concurrent_requests_equal_the_cli(server, reference, tmp_path):
    bodies = concurrent_requests()
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        responses = list(pool.map(lambda body: server.client.post("/v1/generate", json=body), bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text[:200] for r in responses]
    results = [r.json() for r in responses]
    assert len({result["id"] for result in results}) == len(bodies)  # nothing duplicated
    batched = [result["record"].get("batch", {}).get("requests", 1) for result in results]
    assert max(batched) > 1, "concurrent compatible requests should share a denoising loop"
    for body, result in zip(bodies, results):
        images = np.stack([decode_png(image) for image in result["images"]])
        assert result["labels"] == [str(c) for c in body["classes"]]
        expected = reference(body["classes"], body["seed"], body["steps"])
        assert np.abs(images.astype(int) - expected).max() <= 1, body
    for body, result in list(zip(bodies, results))[:1]:  # the CLI itself, with the server's process count
        images = np.stack([decode_png(image) for image in result["images"]])
        cli = cli_images(tmp_path, body["classes"], body["seed"], body["steps"], "--nproc", "2")
        assert np.abs(images.astype(int) - cli).max() <= 1, body
    text = server.client.get("/metrics").text
    assert metric(text, 'opendit_requests_total{status="done"}') >= len(bodies)
    assert metric(text, "opendit_images_total") >= sum(len(body["classes"]) for body in bodies)
    assert metric(text, "opendit_request_latency_seconds_count") >= len(bodies)
    assert metric(text, 'opendit_rank_busy_fraction{rank="1"}') > 0
    assert metric(text, "opendit_queue_length") == 0


def test_jobs_and_events(server):
    job = server.client.post("/v1/jobs", json={"classes": [4], "seed": 2, "steps": 7})
    assert job.status_code == 202
    job_id = job.json()["id"]
    events = []
    with server.client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=60.0) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
    assert events[0] == "queued" and events[-1] == "done", events
    assert events.count("step") == 7
    body = server.client.get(f"/v1/jobs/{job_id}").json()
    assert body["status"] == "done" and body["format"] == "png" and len(body["images"]) == 1
    assert body["record"]["resolved"]["steps"] == 7
    assert server.client.get("/v1/jobs/nope").status_code == 404
    timeline = server.client.get("/v1/trace/last").json()["ranks"]
    assert [row["rank"] for row in timeline] == [0, 1] and all(row["events"] for row in timeline)


def test_openai_client_equals_the_cli(server, tmp_path):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60.0)
    response = client.images.generate(prompt="7", n=2, response_format="b64_json", extra_body={"seed": 31, "steps": 8})
    images = np.stack([decode_png(item.b64_json) for item in response.data])
    cli = cli_images(tmp_path, [7, 7], 31, 8, "--nproc", "2")
    assert images.shape == cli.shape and np.abs(images.astype(int) - cli).max() <= 1
    with pytest.raises(openai.BadRequestError, match="size"):
        client.images.generate(prompt="7", size="17x16", response_format="b64_json")
    with pytest.raises(openai.BadRequestError, match="names no class"):
        client.images.generate(prompt="a cat", response_format="b64_json")
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.images.generate(prompt="7", response_format="b64_json")


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"classes": [10]}, 400, "outside this model's range"),
        ({"classes": [1], "steps": 10**6}, 400, "--max-steps"),
        ({"classes": [1], "image_size": 10**5}, 400, "--max-image-size"),
        ({"classes": [1], "image_size": 17}, 400, "image"),
        ({"classes": [1] * 9}, 400, "--max-batch"),
        ({"classes": [1], "cfg_scale": 0.5}, 400, "cfg"),
        ({"classes": [1], "seed": -1}, 400, "seed"),
        ({"classes": "seven"}, 422, "classes"),
        ({"classes": [1], "colour": "red"}, 422, "colour"),
        ({}, 400, "classes"),
    ],
)
def test_bad_requests_get_4xx_and_the_server_stays_healthy(server, body, status, words):
    response = server.client.post("/v1/jobs", json=body)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"]
    assert server.health()[0] == 200


def test_malformed_json_wrong_key_and_recovery(server):
    bad = server.client.post("/v1/generate", content=b'{"classes": [1', headers={"content-type": "application/json"})
    assert bad.status_code == 422 and "JSON" in bad.json()["error"]["message"]
    for headers in ({}, {"Authorization": "Bearer nope"}):
        response = httpx.post(f"{server.url}/v1/jobs", json={"classes": [1]}, headers=headers)
        assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    good = server.client.post("/v1/generate", json={"classes": [2], "steps": 4})
    assert good.status_code == 200 and len(good.json()["images"]) == 1
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "<html" in page.text.lower()
