"""Fields once: every request field is declared in one place (request.py), and the CLI flags, the Engine keywords
and the server's schema are derived from it — a field added to the model, or a cache method registered from user
code, appears on every surface with no other edit."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

import opendit.api.request as request_module
from opendit.api.request import EngineRequest, ParallelRequest, call_model, field_flag
from opendit.api.surfaces import json_body_model
from opendit.cache.registry import CacheMethod, register_cache_method, unregister_cache_method
from opendit.cli import build_parser
from opendit.errors import OpenDiTError

SRC = Path(__file__).resolve().parents[1] / "src" / "opendit"


def help_text(command: str = "sample") -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return sub.format_help()


def openapi_body_fields() -> dict:
    from fastapi import FastAPI

    app = FastAPI()
    body_model = json_body_model()

    def post(body):
        return {}

    post.__annotations__["body"] = body_model
    app.post("/v1/generate")(post)
    schema = app.openapi()["components"]["schemas"]
    return schema[body_model.__name__]["properties"]


class EchoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    depth: int = Field(3, ge=1, description="blocks echoed")
    window: tuple[float, float] = Field((0.1, 0.8), description="steps where it echoes")


class Echo(CacheMethod):
    """A cache method of this test's own (it is never installed: only its options' surfaces are looked at)."""

    name = "echo"
    Options = EchoOptions


@pytest.fixture
def toy_cache():
    method = register_cache_method(Echo())
    yield method
    unregister_cache_method(method.name)


def test_a_registered_cache_method_gets_its_options_on_every_surface(toy_cache):
    fields = [name for name in call_model().model_fields if name.startswith(toy_cache.name.replace("-", "_") + "_")]
    assert fields, "the toy method's options became call fields"
    for name in fields:
        flag = "--" + name.replace("_", "-")
        assert flag in help_text()  # the CLI
        assert name in openapi_body_fields()  # the server's schema
    # Engine.generate / opendit.generate take them as keywords: the one-shot request knows them
    from opendit.api.generation import GenerationRequest

    request = GenerationRequest(classes=[1], cache=toy_cache.name, **{fields[0]: 2})
    assert getattr(request, fields[0]) == 2
    assert set(fields) == {"echo_depth", "echo_window"}
    with pytest.raises(OpenDiTError, match=r"echo_depth \(--echo-depth\) must be an integer >= 1, got 0"):
        call_model().build({"classes": [1], "cache": "echo", "echo_depth": 0})
    window = call_model().build({"classes": [1], "echo_window": [0.2, 0.5]}).echo_window
    assert window == (0.2, 0.5)  # a JSON / CLI list is the option's tuple
    unregister_cache_method(toy_cache.name)
    assert fields[0] not in call_model().model_fields  # gone with the method
    register_cache_method(toy_cache)


def test_a_field_added_to_the_call_model_appears_on_every_surface(monkeypatch):
    from typing import Annotated

    from opendit.api.request import Int, described

    class WithStrength(request_module.CallRequest):
        strength: Annotated[Int, Field(ge=0, le=9)] | None = described(
            None, help="how strong (test field)", what="an integer from 0 to 9", example="e.g. --strength 3"
        )

    monkeypatch.setattr(request_module, "CallRequest", WithStrength)
    monkeypatch.setattr(request_module, "_CALL_MODELS", {})
    assert "--strength" in help_text() and "how strong (test field)" in help_text()
    assert "strength" in openapi_body_fields()
    from opendit.api.generation import GenerationRequest

    assert GenerationRequest(classes=[1], strength=3).strength == 3
    with pytest.raises(OpenDiTError, match=r"strength must be an integer from 0 to 9, got 12; e.g. --strength 3"):
        call_model().build({"classes": [1], "strength": 12})


def test_every_cli_call_option_is_a_server_field_and_back():
    body = set(openapi_body_fields())
    call = {name for name, info in call_model().model_fields.items()}
    assert body == call - {"out", "trace"}  # files on the server's disk are the server's business
    text = help_text()
    for name, info in call_model().model_fields.items():
        assert field_flag(name, info) in text, name


def test_every_engine_field_is_a_flag_of_sample_and_serve():
    sample, serve = help_text("sample"), help_text("serve")
    for model in (EngineRequest, ParallelRequest):
        for name, info in model.model_fields.items():
            meta = request_module.field_meta(info)
            if name == "parallel" or meta["cli"].get("skip"):
                continue
            assert field_flag(name, info) in sample, name
            if name != "progress":
                assert field_flag(name, info) in serve, name


def _models_declaring() -> dict[str, list[str]]:
    """field name -> the pydantic models in src/ that declare it (class-level annotated names of BaseModel classes)."""
    found: dict[str, list[str]] = {}
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
            if not bases & {"BaseModel", "Schema", "CallRequest"}:
                continue
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    found.setdefault(item.target.id, []).append(f"{path.relative_to(SRC)}:{node.name}")
    return found


def test_each_request_field_is_declared_in_exactly_one_place():
    declared = _models_declaring()
    request_fields = (
        set(EngineRequest.model_fields) | set(ParallelRequest.model_fields) | set(call_model().model_fields)
    )
    from opendit.cache.registry import cache_methods, option_fields

    # a cache option's request field is declared by its method's Options only (under the option's own name)
    # (methods registered by other test files declare their options in tests/, not src/: left out)
    ours = [m for m in cache_methods().values() if type(m).__module__.startswith("opendit.")]
    options = {field: option for m in ours for option, field in option_fields(m)}
    theirs = {field for m in cache_methods().values() if m not in ours for _, field in option_fields(m)}
    for name in sorted(request_fields - theirs):
        if name == "image_size":  # the engine's default size and a call's own: one FieldInfo, two models
            assert EngineRequest.model_fields[name].description == call_model().model_fields[name].description
            assert len(declared[name]) == 2
            continue
        # OpenAI's images protocol has its own `model` (an OpenAI model name the server ignores): not a request field
        places = [p for p in declared.get(options.get(name, name), []) if not p.endswith(":OpenAIImages")]
        assert len(places) == 1, (name, places)
    # and no surface spells a field out again: no literal flag of a request field in the CLI or the server
    flags = {
        field_flag(n, i) for m in (EngineRequest, ParallelRequest, call_model()) for n, i in m.model_fields.items()
    }
    for path in [*(SRC / "cli").glob("*.py"), *(SRC / "serve").glob("*.py")]:
        text = path.read_text()
        spelled = [flag for flag in flags if f'add_argument("{flag}"' in text or f"add_argument('{flag}'" in text]
        assert not spelled, (path.name, spelled)


def test_the_server_body_is_strict_about_unknown_fields():
    model = json_body_model()
    assert issubclass(model, BaseModel) and model.model_config.get("extra") == "forbid"


def test_commands_that_borrow_a_field_keep_their_own_defaults():
    """plan, convert, calibrate, eval and train take some request fields' flags with defaults of their own."""
    from opendit.cli import build_parser

    parser = build_parser()
    ev = parser.parse_args(["eval"])
    assert (ev.out, ev.seed, ev.steps, ev.cfg_scale, ev.ckpt) == (None, 0, None, None, None)  # no report file
    plan = parser.parse_args(["plan", "--nproc", "2"])
    assert (plan.model, plan.cfg_scale, plan.steps, plan.dtype) == ("DiT-XL/2", 4.0, 50, None)
    convert = parser.parse_args(["convert", "a.pt", "b.safetensors"])
    assert (convert.model, convert.image_size, convert.dtype) == (None, None, None)
    assert parser.parse_args(["calibrate"]).nproc == 2
