"""Start `opendit serve` as a real process on a free loopback port, for the serving tests."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import numpy as np
from PIL import Image

START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, process: subprocess.Popen, port: int, api_key: str | None):
        self.process, self.port, self.api_key = process, port, api_key
        self.url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=60.0)

    def health(self) -> tuple[int, dict]:
        response = httpx.get(f"{self.url}/healthz", timeout=5.0)
        return response.status_code, response.json()

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: {self.output()}")
            try:
                status, body = self.health()
                if status == 200:
                    return body
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"the server was not healthy within {timeout} s")

    def output(self) -> str:
        return self.process.stdout.read() if self.process.poll() is not None and self.process.stdout else ""


@contextmanager
def running_server(*flags: str, api_key: str | None = None):
    """`opendit serve --nproc 2` (or flags) on a free port; SIGTERM (then SIGKILL) on the way out."""
    port = free_port()
    command = [sys.executable, "-m", "opendit", "serve", "--host", "127.0.0.1", "--port", str(port), *flags]
    if api_key:
        command += ["--api-key", api_key]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Server(process, port, api_key)
    try:
        server.wait_healthy()
        yield server
    finally:
        server.client.close()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def decode_png(b64: str) -> np.ndarray:
    """base64 PNG -> (H, W, C) uint8."""
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
    return image[..., None] if image.ndim == 2 else image


def cli_images(tmp_path, classes: list[int], seed: int, steps: int, *flags: str) -> np.ndarray:
    """`opendit sample` with these settings: its per-image PNGs, (B, H, W, C) uint8."""
    out = tmp_path / f"cli-{seed}-{steps}-{'-'.join(map(str, classes))}"
    command = [sys.executable, "-m", "opendit", "sample", "--classes", *map(str, classes), "--seed", str(seed),
               "--steps", str(steps), "--out", str(out), "--no-progress", *flags]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    files = sorted(path for path in out.glob("*.png") if path.name != "samples.png")
    return np.stack([decode_png(base64.b64encode(path.read_bytes()).decode()) for path in files])
