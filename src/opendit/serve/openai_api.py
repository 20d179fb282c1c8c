"""POST /v1/images/generations, OpenAI's images API: `prompt`, `n`, `size` "WxH", `response_format` "b64_json";
every other call field (`seed`, `steps`, `cfg_scale`, `cache`, ...) as extra fields (the client's extra_body).
For a class-conditional model the prompt is a class id or a label name ("7"); for the digits video model "7" or
"7 right"; a pipeline takes the text itself (n images of one prompt in one pipeline call). `model` is accepted and
ignored: the server runs the model it loaded."""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, create_model

from opendit.api.surfaces import json_body_model
from opendit.serve.encode import encode_result
from opendit.serve.state import RequestError, ServeState

DIRECTIONS = ("right", "left", "down", "up")


class OpenAIImages(BaseModel):
    """OpenAI's own fields of an images request."""

    model_config = ConfigDict(extra="ignore")  # OpenAI's other fields (quality, style, user, ...) do not apply
    prompt: str
    n: int = 1
    size: str | None = None
    response_format: str = "b64_json"
    model: str | None = None


OWN = ("classes", "prompt", "image_size", "motion")  # what the OpenAI fields above stand for (to_fields)


def images_body_model() -> type[BaseModel]:
    """OpenAI's fields plus every call field a client may send besides them (seed, steps, cfg_scale, cache, ...; the
    client's extra_body), derived from the job body (surfaces.py)."""
    job = json_body_model()
    extra = {name: (info.annotation, info) for name, info in job.model_fields.items() if name not in OWN}
    return create_model("ImagesBody", __base__=OpenAIImages, **extra)


def to_fields(body: OpenAIImages, state: ServeState) -> dict:
    """The images request as the job schema's fields (RequestError for what does not translate)."""
    if body.response_format != "b64_json":
        raise RequestError(f"response_format {body.response_format!r} is not served; use 'b64_json'",
                           param="response_format")  # fmt: skip
    if body.n < 1:
        raise RequestError(f"n must be >= 1, got {body.n}", param="n")
    fields = {name: value for name, value in body.model_dump().items() if name not in OpenAIImages.model_fields}
    if body.size is not None:
        fields["image_size"] = _square(body.size)
    if state.kind == "prompt":
        return {**fields, "prompt": [body.prompt] * body.n}
    words = body.prompt.strip().lower().split()
    labels = state.spec.class_labels()
    if state.kind == "video" and len(words) == 2 and words[1] in DIRECTIONS:
        fields["motion"] = [words[1]]
        words = words[:1]
    name = " ".join(words)
    if name not in [label.lower() for label in labels]:
        shown = ", ".join(labels[:12]) + (" ..." if len(labels) > 12 else "")
        raise RequestError(f"prompt {body.prompt!r} names no class of this model; use a class id or label ({shown})",
                           param="prompt")  # fmt: skip
    return {**fields, "classes": [[label.lower() for label in labels].index(name)] * body.n}


def _square(size: str) -> int:
    width, sep, height = size.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise RequestError(f"size {size!r} must be 'WxH', e.g. '256x256'", param="size")
    if width != height:
        raise RequestError(f"size {size!r}: this model makes square images; use '{width}x{width}'", param="size")
    return int(width)


def images_response(job, body: OpenAIImages) -> dict:
    _, images = encode_result(job.result)
    return {"created": int(time.time()), "data": [{"b64_json": image, "revised_prompt": body.prompt}
                                                  for image in images]}  # fmt: skip
