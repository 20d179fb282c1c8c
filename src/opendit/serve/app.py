"""The FastAPI app of `opendit serve` (routes; the engine thread is runner.py, the queue jobs.py).

Every error is JSON {"error": {"message", "type", "param", "code"}} (OpenAI's shape, so its clients show the message):
400 a value the model or the server's limits refuse, 401 a wrong or missing API key, 404 an unknown job, 422 a body
that is not JSON or has wrong types or unknown fields, 429 a full queue, 503 a worker that died mid-job or a server
that is stopping.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from opendit.api.surfaces import json_body_model
from opendit.serve.encode import encode_result, timeline
from opendit.serve.jobs import Job, NotAccepting, QueueFull
from opendit.serve.openai_api import images_body_model, images_response, to_fields
from opendit.serve.state import RequestError, ServeState

PAGE = Path(__file__).with_name("page.html")
WAIT_POLL_S = 0.02  # how often a waiting request looks at its job (no thread is held while waiting)
SHUTDOWN_DRAIN_S = 25.0


def error_body(message: str, status: int, param: str | None = None) -> JSONResponse:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}  # fmt: skip
    error = {"message": message, "type": kinds.get(status, "server_error"), "param": param, "code": status}
    return JSONResponse({"error": error}, status_code=status)


def create_app(state: ServeState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        state.runner.start()
        yield
        # SIGTERM: uvicorn has stopped accepting and waited for open requests; finish what is queued, then close
        await asyncio.to_thread(state.runner.stop, SHUTDOWN_DRAIN_S)

    app = FastAPI(title="OpenDiT", lifespan=lifespan)
    app.state.serve = state
    _add_error_handlers(app)
    authorised = _key_check(state)
    _add_job_routes(app, state, authorised)
    _add_info_routes(app, state, authorised)
    return app


def _key_check(state: ServeState):
    """The dependency that refuses a missing or wrong API key (when the server has one)."""

    def authorised(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), state.api_key.encode()):
            raise RequestError("a valid API key is required: send the header 'Authorization: Bearer KEY'", 401)

    return authorised


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def _request_error(_request, exc: RequestError):
        return error_body(exc.message, exc.status, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return error_body(f"invalid request body: {problems}", 422)

    @app.exception_handler(HTTPException)
    async def _http_error(_request, exc: HTTPException):
        return error_body(str(exc.detail), exc.status_code)


def submit(state: ServeState, fields: dict) -> Job:
    """Check a client's fields and queue the job (RequestError: 400, 429 full, 503 stopping)."""
    job = state.check(fields)
    try:
        state.queue.submit(job)
    except QueueFull as exc:
        state.metrics.requests.labels(status="rejected").inc()
        raise RequestError(str(exc), 429) from None
    except NotAccepting as exc:
        raise RequestError(str(exc), 503) from None
    state.metrics.queue_length.set(len(state.queue))
    return job


async def finished(job: Job) -> Job:
    while not job.done_event.is_set():
        await asyncio.sleep(WAIT_POLL_S)
    return job


def job_view(state: ServeState, job: Job) -> dict:
    """GET /v1/jobs/{id}: status and progress; once done, the images, labels and record."""
    view = {"id": job.id, "status": job.status, "step": job.step, "steps": job.steps, "error": job.error,
            "plan": state.spec.plan.describe()}  # fmt: skip
    if job.started is not None:
        end = job.finished or time.time()
        view["timing"] = {"queued_s": job.started - job.created, "run_s": end - job.started,
                          "total_s": end - job.created}  # fmt: skip
    if job.finished_ok:
        view["format"], view["images"] = encode_result(job.result)
        view["labels"] = state.label_text(job.result.labels)
        view["record"] = job.result.record
    return view


def known(state: ServeState, job_id: str) -> Job:
    job = state.queue.get(job_id)
    if job is None:
        raise RequestError(f"no job {job_id!r} (unknown, or finished long ago)", 404)
    return job


async def event_stream(job: Job, request: Request):
    """The job's events as server-sent events, from the first, until done or failed (or the client leaves)."""
    sent = 0
    while True:
        events = job.events[sent:]
        for name, data in events:
            yield f"event: {name}\ndata: {json.dumps(data)}\n\n"
        sent += len(events)
        if job.done_event.is_set() and sent == len(job.events):
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(WAIT_POLL_S)


def _add_job_routes(app: FastAPI, state: ServeState, authorised) -> None:
    guarded = [Depends(authorised)]
    # POST /v1/jobs and /v1/generate: every call field a client may send, derived when the app is made (surfaces.py:
    # the request model's fields, every registered cache method's options included; request.py checks the values,
    # so errors read as on the CLI)
    job_body = json_body_model()

    def post_job(body):
        job = submit(state, body.model_dump())
        return {"id": job.id, "status": job.status}

    post_job.__annotations__["body"] = job_body  # a class made at runtime: no name for a string annotation
    app.post("/v1/jobs", status_code=202, dependencies=guarded)(post_job)

    @app.get("/v1/jobs/{job_id}", dependencies=guarded)
    def get_job(job_id: str):
        return job_view(state, known(state, job_id))

    @app.get("/v1/jobs/{job_id}/events", dependencies=guarded)
    async def job_events(job_id: str, request: Request):
        stream = event_stream(known(state, job_id), request)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def generate(body):
        job = await finished(submit(state, body.model_dump()))
        if not job.finished_ok:
            return error_body(job.error, job.http_status)
        view = job_view(state, job)
        return {key: view[key] for key in ("id", "format", "images", "labels", "record", "timing")}

    generate.__annotations__["body"] = job_body
    app.post("/v1/generate", dependencies=guarded)(generate)

    async def images_generations(body):
        job = await finished(submit(state, to_fields(body, state)))
        if not job.finished_ok:
            return error_body(job.error, job.http_status)
        return images_response(job, body)

    images_generations.__annotations__["body"] = images_body_model()  # OpenAI's fields + the call's other fields
    app.post("/v1/images/generations", dependencies=guarded)(images_generations)


def _add_info_routes(app: FastAPI, state: ServeState, authorised) -> None:
    @app.get("/v1/info")
    def info():
        return state.info()

    @app.get("/v1/trace/last", dependencies=[Depends(authorised)])
    def last_trace():
        return {"plan": state.spec.plan.describe(), "ranks": timeline(state.runner.last_batch)}

    @app.get("/healthz")
    def healthz():
        runner = state.runner
        status = "stopping" if not state.queue.accepting and runner.state == "ok" else runner.state
        body = {"status": status, "workers": runner.worker_pids, "restarts": runner.restarts,
                "queue": len(state.queue), "running": len(runner.running), "last_error": runner.last_error}  # fmt: skip
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics", dependencies=[Depends(authorised)])
    def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    def page():
        if not PAGE.exists():
            return HTMLResponse("<p>page.html is missing from this install</p>", status_code=500)
        return HTMLResponse(PAGE.read_text())
