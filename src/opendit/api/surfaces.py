"""The request's fields as each surface shows them, derived from their one declaration (request.py, `described`):
the argparse flags of `opendit sample` and `opendit serve` and the values they give back (`add_request_flags`,
`flag_values`), and the server's JSON body (`json_body_model`). A field added to a request model, or a cache method
registered with options, appears on every surface with no other edit."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from opendit.api.request import EngineRequest, ParallelRequest, call_model, field_flag, field_meta
from opendit.distributed.config import MESH_DIMS

GROUPS = {
    "parallel": "parallel (one mesh: pipefusion x dp x cfg x ring x ulysses x tp = processes)",
    "video": "video (a video DiT: the bundled moving-digits model, or --model Latte-*/p --ckpt)",
    "diffusers": "diffusers pipelines (their own loop and scheduler; the transformer parallelised)",
    "cache": "caching across steps (opendit/cache; defaults per model in docs/caching.md)",
}


def request_models(engine_skip: tuple[str, ...] = ()) -> list[tuple[type[BaseModel], tuple[str, ...]]]:
    """(model, field names left out) for a command that takes a whole request: the engine's fields (the plan's
    degrees as their own flags), then the call's."""
    return [(EngineRequest, ("parallel", *engine_skip)), (ParallelRequest, ()), (call_model(), ())]


def add_request_flags(parser: argparse.ArgumentParser, models) -> list[str]:
    """One flag per field of `models` ((model, skipped names) pairs); returns the field names added (a field two
    models share, image_size, once)."""
    groups: dict[str | None, Any] = {None: parser}
    added: list[str] = []
    for model, skip in models:
        for name, info in model.model_fields.items():
            meta = field_meta(info)
            cli = meta.get("cli", {})
            if name in skip or name in added or not meta or cli.get("skip"):
                continue
            group = cli.get("group")
            if group not in groups:
                groups[group] = parser.add_argument_group(GROUPS[group])
            groups[group].add_argument(field_flag(name, info), dest=name, help=info.description, **_argparse(info))
            added.append(name)
    return added


def add_field_flags(parser: argparse.ArgumentParser, model, fields: dict[str, dict]) -> None:
    """Flags for a few of `model`'s fields in a command that is not a request (`opendit plan`, `calibrate`): each
    field's own flag, type and help, with the command's own default or help where `fields[name]` gives them."""
    for name, own in fields.items():
        info = model.model_fields[name]
        kwargs = {**_argparse(info), "help": info.description, **own}
        parser.add_argument(field_flag(name, info), dest=name, **kwargs)


def flag_values(args: argparse.Namespace, names: list[str], model) -> dict:
    """The values of the flags that were given, by field name (flags left out are absent: the schema's defaults)."""
    values = {}
    for name in names:
        info = model.model_fields.get(name)
        if info is None:
            continue
        value = getattr(args, name)
        cli = field_meta(info).get("cli", {})
        if "true" in cli:  # a choice that stands for a switch (--parallel auto)
            value = value == cli["true"] if value is not None else None
        if value is None or (value == info.default and name not in MESH_DIMS):  # the schema's default: as if left
            continue  # out; a degree given explicitly (--ulysses 1) is kept: that plan is asked for, not chosen
        values[name] = value
    return values


def _argparse(info) -> dict:
    """argparse keywords for a field: its type (lists and fixed tuples as nargs), switches as actions."""
    cli = dict(field_meta(info).get("cli", {}))
    kwargs: dict[str, Any] = {"default": cli.get("default")}
    base, count = _plain(info.annotation)
    if "choices" in cli:  # a choice of names (a switch spelled as a choice too: --parallel auto)
        base, count = str, None
    if "action" in cli:
        kwargs["action"] = cli["action"]
        if cli["action"] == "store_const":
            kwargs["const"] = cli["const"]
        elif cli["action"] == "store_false":
            kwargs["default"] = True
        elif cli["action"] == "extend":
            kwargs.update(nargs=cli.get("nargs", "+"), type=base)
    elif base is bool:
        kwargs.update(action="store_true", default=False)
    else:
        kwargs["type"] = base
        if count is not None or "nargs" in cli:
            kwargs["nargs"] = cli.get("nargs", count)
        if "const" in cli:  # an optional value: the flag alone stands for it (--vae-parallel = on)
            kwargs["const"] = cli["const"]
    choices = cli.get("choices")
    if choices == "strategies":
        from opendit.parallel.registry import strategies

        choices = ("auto", *strategies())  # every registered strategy (opendit plan --list-strategies)
    if choices is not None:
        kwargs["choices"] = tuple(choices)
    if "metavar" in cli:
        metavar = cli["metavar"]
        kwargs["metavar"] = tuple(metavar) if isinstance(metavar, list) else metavar
    return kwargs


def _plain(annotation) -> tuple[type, int | str | None]:
    """(the Python type a flag's values take, nargs: "+" for a list, N for an N-tuple, None for one value)."""
    annotation = _strip(annotation)
    origin = typing.get_origin(annotation)
    if origin is list:
        return _plain(typing.get_args(annotation)[0])[0], "+"
    if origin is tuple:
        args = typing.get_args(annotation)
        return _plain(args[0])[0], (len(args) if Ellipsis not in args else "+")
    if origin is typing.Literal:
        return type(typing.get_args(annotation)[0]), None
    if isinstance(annotation, type) and annotation in (int, float, bool, str):
        return annotation, None
    return str, None  # a str or dict field (--cache): the flag takes a name


def _strip(annotation):
    """The annotation without Annotated's metadata and without None in a union (a union's first other member)."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _strip(members[0])
    return annotation


def _json_type(annotation):
    """The JSON type of a field for the server's schema (bounds and rules stay the request model's, so that a bad
    value gets the same one-line message as on the CLI): lists also take one item."""
    base, count = _plain(annotation)
    if count == "+":
        return list[base] | base
    if count is not None:
        return list[base]
    plain = _strip(annotation)
    if typing.get_origin(plain) is typing.Literal or plain in (int, float, bool, str):
        return plain
    return str | dict  # --cache: a method name, or {"method": name, **options}


def json_body_model(name: str = "JobBody") -> type[BaseModel]:
    """The server's body for a job: every call field a client may send (not `out` / `trace`, which name files on
    the server's disk), with its description; the values are checked by the request model."""
    fields = {}
    for field, info in call_model().model_fields.items():
        if field_meta(info).get("cli", {}).get("server") is False:
            continue
        default = info.default if info.default is not None and not isinstance(info.default, BaseModel) else None
        fields[field] = (_json_type(info.annotation) | None, Field(default, description=info.description))
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)
