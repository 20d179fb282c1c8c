"""What the HTTP handlers share: the engine's spec (to check requests without the engine), limits, queue, runner."""

from __future__ import annotations

from dataclasses import dataclass

from opendit.api.generation import resolve_call
from opendit.api.request import call_model
from opendit.errors import OpenDiTError
from opendit.serve.jobs import Job, JobQueue
from opendit.serve.metrics import ServeMetrics


@dataclass
class Limits:
    """Caps on what one client may ask (flags of `opendit serve`), checked before the model's own rules."""

    max_steps: int = 100
    max_batch: int = 16  # images per request, and per denoising loop
    max_image_size: int = 1024
    max_prompt_chars: int = 1000
    queue_size: int = 64


class RequestError(Exception):
    """A client's request is refused: HTTP `status` with `message`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


@dataclass
class ServeState:
    spec: object  # generation.EngineSpec of the engine (rank 0's: the plan every call runs with)
    limits: Limits
    queue: JobQueue
    metrics: ServeMetrics
    runner: object = None  # runner.EngineRunner, set once the engine is up
    api_key: str | None = None
    nproc: int = 1

    @property
    def kind(self) -> str:
        return self.spec.client_kind

    def check(self, fields: dict) -> Job:
        """A client's fields -> a queued-to-be Job, or RequestError naming what to change."""
        fields = {name: value for name, value in fields.items() if value is not None}
        limits = self.limits
        steps = fields.get("steps")
        if isinstance(steps, int) and steps > limits.max_steps:
            raise RequestError(f"steps {steps} exceeds this server's limit of {limits.max_steps} (--max-steps)",
                               param="steps")  # fmt: skip
        size = fields.get("image_size")
        if isinstance(size, int) and size > limits.max_image_size:
            raise RequestError(
                f"image_size {size} exceeds this server's limit of {limits.max_image_size} (--max-image-size)",
                param="image_size",
            )
        prompts = fields.get("prompt")
        for prompt in [prompts] if isinstance(prompts, str) else prompts or []:
            if isinstance(prompt, str) and len(prompt) > limits.max_prompt_chars:
                raise RequestError(f"a prompt of {len(prompt)} characters exceeds this server's limit of "
                                   f"{limits.max_prompt_chars} (--max-prompt-chars)", param="prompt")  # fmt: skip
        images = _count(fields.get("classes")) or _count(prompts)
        if images > limits.max_batch:
            raise RequestError(f"{images} images in one request exceed this server's limit of {limits.max_batch} "
                               "(--max-batch); split the request", param="classes")  # fmt: skip
        try:
            call = resolve_call(self.spec, call_model().build(fields))
        except OpenDiTError as exc:
            raise RequestError(str(exc)) from None
        count = len(call.classes) if hasattr(call, "classes") else len(call.prompts)
        return Job(call=call, images=count)

    def label_text(self, labels: list) -> list[str]:
        """A result's labels as text: a motion model's "3 up" (its label is digit + 10 * direction)."""
        if self.kind == "video" and getattr(self.spec.config, "motion", False):
            from opendit.api.video import label_names

            names = label_names(self.spec.config)
            return [names[label] for label in labels]
        return [str(label) for label in labels]

    def info(self) -> dict:
        config, defaults = self.spec.config, self.spec.defaults
        labels = self.spec.class_labels()
        return {
            "model": self.spec.settings.model
            or self.spec.settings.diffusers
            or f"digits{' video' * self.spec.settings.video} (shipped)",
            "kind": self.kind,
            "num_classes": len(labels),
            "labels": labels,
            "image_size": _image_size(config),
            "image_sizes": [_image_size(config)],
            "default_steps": defaults.get("steps"),
            "default_cfg_scale": defaults.get("cfg_scale"),
            "max_steps": self.limits.max_steps,
            "max_batch": self.limits.max_batch,
            "plan": self.spec.plan.describe(),
            "nproc": self.nproc,
            "auth": self.api_key is not None,
        }


def _image_size(config) -> int | None:
    size = getattr(config, "image_size", None)
    size = size() if callable(size) else size
    return int(size[0]) if isinstance(size, tuple) else size


def _count(value) -> int:
    if value is None:
        return 0
    return len(value) if isinstance(value, list | tuple) else 1
