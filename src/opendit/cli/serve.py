"""`opendit serve`: the engine (its workers loaded once) behind HTTP on rank 0 (opendit/serve)."""

from __future__ import annotations

import argparse
import sys


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    from opendit.api.request import EngineRequest, ParallelRequest
    from opendit.api.surfaces import add_request_flags

    parser = subparsers.add_parser("serve", help="serve a model over HTTP (REST + OpenAI images API + web page)")
    # the engine's fields, as for `opendit sample` (request.py declares each one); the calls come over HTTP
    fields = add_request_flags(parser, [(EngineRequest, ("parallel", "progress")), (ParallelRequest, ())])
    http = parser.add_argument_group("server")
    http.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 and /metrics (when exposed)")
    http.add_argument("--max-steps", type=int, default=100, help="denoising steps a request may ask (default 100)")
    http.add_argument("--max-batch", type=int, default=16, help="images per request and per loop (default 16)")
    http.add_argument("--max-image-size", type=int, default=1024, help="largest image size asked (default 1024)")
    http.add_argument("--max-prompt-chars", type=int, default=1000, help="longest prompt (default 1000)")
    http.add_argument("--queue-size", type=int, default=64, help="jobs waiting before 429 (default 64)")
    http.add_argument("--max-restarts", type=int, default=3, help="worker restarts before the server exits (3)")
    parser.set_defaults(func=run_serve, fields=fields)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from opendit.cli import request_values
    from opendit.engine import Engine
    from opendit.errors import OpenDiTError
    from opendit.serve.app import create_app
    from opendit.serve.jobs import JobQueue
    from opendit.serve.metrics import ServeMetrics
    from opendit.serve.runner import EngineRunner
    from opendit.serve.state import Limits, ServeState

    for flag in ("max_steps", "max_batch", "max_image_size", "max_prompt_chars", "queue_size"):
        if getattr(args, flag) < 1:
            raise OpenDiTError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0 < args.port < 65536:
        raise OpenDiTError(f"--port must be 1..65535, got {args.port}")
    settings = request_values(args)
    limits = Limits(args.max_steps, args.max_batch, args.max_image_size, args.max_prompt_chars, args.queue_size)
    queue, metrics = JobQueue(limits.queue_size, limits.max_batch), ServeMetrics()
    server: list[uvicorn.Server] = []
    fatal: list[str] = []

    def on_fatal(message: str) -> None:  # from the engine thread: the workers cannot be brought back
        fatal.append(message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        if server:
            server[0].should_exit = True

    runner = EngineRunner(lambda: Engine(**settings), queue, metrics, args.max_restarts, on_fatal)  # loads now
    state = ServeState(runner.engine.spec, limits, queue, metrics, runner, args.api_key, runner.engine.world_size)
    config = uvicorn.Config(create_app(state), host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=20)  # fmt: skip
    server.append(_draining_server(uvicorn)(config))
    print(f"opendit serve: {state.info()['model']} on {state.nproc} process(es), {state.spec.plan.describe()}; "
          f"http://{args.host}:{args.port}/", flush=True)  # fmt: skip
    try:
        server[0].run()
    finally:
        if runner.state not in ("stopped",):
            runner.stop(5.0)
    return 1 if fatal else 0


def _draining_server(uvicorn):
    """uvicorn.Server whose SIGTERM is a clean stop: stop accepting, finish open requests and the queued jobs
    (create_app's lifespan), exit 0. (uvicorn itself re-raises the signal after its shutdown: status 143.)"""
    import signal

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if sig == signal.SIGTERM:
                self.should_exit = True
                return
            super().handle_exit(sig, frame)

    return DrainingServer
