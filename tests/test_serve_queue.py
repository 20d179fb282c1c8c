"""The serving queue without a server: batching of compatible calls, the image cap, fairness, limits."""

from __future__ import annotations

from dataclasses import replace

import pytest

from opendit.engine import Engine
from opendit.serve.jobs import Job, JobQueue, NotAccepting, QueueFull


@pytest.fixture(scope="module")
def engine():
    with Engine(nproc=1) as engine:
        yield engine


def job(engine, classes, steps=6, seed=0) -> Job:
    call = engine.check(classes=classes, steps=steps, seed=seed)
    return Job(call=call, images=len(call.classes))


def test_compatible_jobs_batch_up_to_the_cap_and_the_oldest_always_runs(engine):
    queue = JobQueue(limit=10, max_batch=4)
    a, b, c, d, e = (job(engine, [1], 6), job(engine, [2, 3], 9), job(engine, [4, 5], 6), job(engine, [6, 7], 6),
                     job(engine, [8], 6))  # fmt: skip
    for item in (a, b, c, d, e):
        queue.submit(item)
    first = queue.next_batch(0.0)
    assert [j.id for j in first] == [a.id, c.id, e.id]  # same settings as the oldest, <= 4 images; d would make 5
    second = queue.next_batch(0.0)
    assert [j.id for j in second] == [b.id]  # the oldest waiting job runs next even though it batches with nobody
    assert [j.id for j in queue.next_batch(0.0)] == [d.id]
    assert queue.next_batch(0.0) == []


def test_queue_limit_and_stop(engine):
    queue = JobQueue(limit=2, max_batch=4)
    queue.submit(job(engine, [1]))
    queue.submit(job(engine, [1]))
    with pytest.raises(QueueFull, match="full"):
        queue.submit(job(engine, [1]))
    assert len(queue.stop("stopping")) == 2
    with pytest.raises(NotAccepting, match="stopping"):
        queue.submit(job(engine, [1]))


def test_merged_run_equals_each_call_alone(engine):
    calls = [engine.check(classes=[3, 1], seed=9, steps=5), engine.check(classes=[8], seed=2, steps=5)]
    merged = engine.run_calls(calls)
    for call, result in zip(calls, merged):
        alone = engine.run_calls([call])[0]
        assert (alone.images == result.images).all()
    with pytest.raises(ValueError, match="merge_key"):
        engine.run_calls([calls[0], replace(calls[1], steps=6)])


def test_gif_and_timeline_encoding():
    import base64
    import io

    import numpy as np
    from PIL import Image

    from opendit.serve.encode import gif_b64, timeline

    frames = np.random.default_rng(0).integers(0, 255, size=(4, 8, 8, 1), dtype=np.uint8)
    gif = Image.open(io.BytesIO(base64.b64decode(gif_b64(frames))))
    assert gif.format == "GIF" and gif.n_frames == 4 and gif.size == (8, 8)
    record = {"ranks": [{"rank": r, "per_step_s": [0.1, 0.2], "comm_per_step": [{"all_to_all": {"wait_s": 0.05}}, {}]}
                        for r in range(2)]}  # fmt: skip
    rows = timeline(record)
    assert [row["rank"] for row in rows] == [0, 1]
    names = [event["name"] for event in rows[0]["events"]]
    assert names == ["step 1", "comm wait (all_to_all)", "step 2"]
    assert abs(rows[0]["events"][2]["start_ms"] - 100.0) < 1e-9 and abs(rows[0]["events"][1]["dur_ms"] - 50) < 1e-9
