"""Fuzzing the request boundary (hypothesis): `opendit sample`'s parser + the schema, and the Python API's request
building (`Engine(...)`, `Engine.generate(...)`, `opendit.generate(...)`), with generated values of every field:
extremes, NaN/inf, wrong types, huge lists, unicode strings, negative numbers.

The property: the outcome is either a valid request whose fields equal what was passed (and lie within the schema's
bounds), or ONE OpenDiTError (CLI: exit status 2 and one stderr line starting "error: ") - never another exception,
a hang (each validation is timed) or a silent correction. Validation only: the CLI stops before `execute_sample`, and
the engine's Replica / WorkerPool are replaced by stubs that record what they would have run. A few valid generated
requests also run for real (2 steps, the bundled digits model, one process).

Examples are derandomized (the same every run). Profiles: OPENDIT_FUZZ_PROFILE=ci (`make test`) or fast
(`make test-fast`, and the default).
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import opendit
import opendit.cli
import opendit.distributed.launch
import opendit.engine.executors
from opendit.api.generation import DEFAULT_CKPT
from opendit.api.request import MAX_CFG_SCALE, MAX_CLASSES, MAX_IMAGE_SIZE, MAX_STEPS, SEED_MAX
from opendit.distributed.config import ParallelConfig
from opendit.errors import OpenDiTError
from opendit.io.outputs import GenerationResult

settings.register_profile(
    "ci", max_examples=40,  # per fuzzed field (each test runs once per field)
    derandomize=True, database=None, print_blob=False,
    deadline=None,  # timed in the property instead: a first call that imports modules is not a hang
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)  # fmt: skip
settings.register_profile("fast", settings.get_profile("ci"), max_examples=4)
FUZZ = settings.get_profile(os.environ.get("OPENDIT_FUZZ_PROFILE", "fast"))
SLOWEST_S = 15.0  # one validation; they take 0.01-0.2 s (the planner for 256 ranks ~2 s): more is a hang

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not DEFAULT_CKPT.is_file(), reason="the shipped digits model is not installed"),
]

# ------------------------------------------------------------------------------------------------ values
EDGE_INTS = [0, 1, 2, 3, 9, 10, 16, 30, 256, 257, 1000, 1001, 1024, 1025, 8192, 8193, 2**31, 2**63, SEED_MAX]
EDGE_INTS += [SEED_MAX + 1, 10**30, -1, -2, -(2**63), -(10**30)]
INTS = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-3, 40), st.integers())
FLOATS = st.one_of(
    st.floats(0.5, 8.0), st.sampled_from([1.0, 100.0, 100.5, math.nan, math.inf, -math.inf, 0.0, 1e308]), st.floats()
)
TEXT = st.text(max_size=12)  # any unicode but lone surrogates
JUNK = st.one_of(TEXT, st.sampled_from(["", " ", "3.0", "1e3", "0x10", "nan", "-inf", "٣", "1_0", "a\nb", "\0"]))
ODD = st.one_of(  # wrong types for any field; first what a lax parser would coerce (True -> 1, "3" -> 3, 3.0 -> 3)
    st.sampled_from(["3", "16", "2.5", "1e3", 3.0, 16.0, True, False, 1, None]),
    st.sampled_from([np.int64(3), np.float32(2.5), np.bool_(True), torch.tensor(2), Path("p"), {"a": 1}, (1,)]),
    st.booleans(), INTS, FLOATS, TEXT, st.binary(max_size=3), st.lists(st.integers(), max_size=3),
)  # fmt: skip
NEAR_SEED_MAX = st.integers(SEED_MAX - 12, SEED_MAX + 1)  # seed + len(classes) - 1 crosses the generator's range
NAME = TEXT.map(lambda t: "n" + t.replace("/", "_").replace("\0", "_"))  # one path component: never "", "." or ".."
ABSENT = object()  # a field left out (its default)


def sometimes(strategy):
    """A valid value for a field, or the field left out."""
    return st.one_of(st.just(ABSENT), strategy)


@st.composite
def perturbed(draw, focus: str, valid: dict, fuzz: dict, plans: list[dict] | None = None):
    """A request that is valid field by field (the fields of `valid`, and one of `plans`), then the field `focus`
    and maybe one other replaced by fuzz values: every field's checks are reached, alone or with another bad field."""
    values = {name: value for name, strategy in valid.items() if (value := draw(strategy)) is not ABSENT}
    values |= draw(st.sampled_from(plans)) if plans else {}
    others = draw(st.permutations(sorted(set(fuzz) - {focus})))
    for name in [focus, *others[: draw(st.integers(0, 1))]]:
        value = draw(fuzz[name])
        if value is ABSENT:
            values.pop(name, None)
        else:
            values[name] = value
    return values


PATH_KINDS = ("new", "root", "file", "under-file", "raw", "long")
PATHS = st.tuples(st.sampled_from(PATH_KINDS), NAME, TEXT.map(lambda t: t.lstrip("/")).filter(lambda t: ".." not in t))
NEW_PATH = st.tuples(st.just("new"), NAME, st.just(""))


def place(spec: tuple, root: Path, suffix: str = "") -> str:
    """Where a generated --out / --trace points: a new path under the fuzz root, the root itself (a folder), a file,
    a path under a file, raw text (relative to the root: no leading "/" and no "..", so nothing is written outside
    it), or a 300-byte name."""
    kind, name, raw = spec
    return {
        "new": str(root / "made" / (name + suffix)), "root": str(root), "file": str(root / "a-file"),
        "under-file": str(root / "a-file" / name), "raw": raw, "long": str(root / ("x" * 300)),
    }[kind]  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The fuzz's folder, also its working directory (raw relative paths land in it)."""
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "a-file").write_text("in the way")
    cwd = os.getcwd()
    os.chdir(folder)
    yield folder
    os.chdir(cwd)


def assert_in_bounds(call, steps: int, cfg_scale: float, config) -> None:
    """What the workers trust (they do not re-check): every bound of the schema holds."""
    assert 1 <= len(call.classes) <= MAX_CLASSES and call.seed >= 0 and call.seed + len(call.classes) - 1 <= SEED_MAX
    assert 1 <= steps <= MAX_STEPS and math.isfinite(cfg_scale) and 1.0 <= cfg_scale <= MAX_CFG_SCALE
    assert 0 < config.image_size[0] <= MAX_IMAGE_SIZE


def timed(fn):
    start = time.perf_counter()
    try:
        return fn()
    finally:
        assert time.perf_counter() - start < SLOWEST_S, "validation took too long"


def assert_one_line(message: str) -> None:
    event(f"error: {message.split(' ')[0]}")  # `--hypothesis-show-statistics` shows how often each field refused
    assert message and len(message.splitlines()) == 1 and "Traceback" not in message, message


# ------------------------------------------------------------------------------------------------ the CLI
INT_TOKEN = st.one_of(INTS.map(str), JUNK)
FLOAT_TOKEN = st.one_of(FLOATS.map(str), INTS.map(str), JUNK)
SWITCHES = ("--cfg-parallel", "--shard-weights", "--balance-tokens", "--no-progress")
CLI_VALID = {
    "--classes": sometimes(st.lists(st.integers(0, 9).map(str), min_size=1, max_size=12)),
    "--seed": sometimes(st.integers(0, SEED_MAX - 16).map(str)),
    "--steps": sometimes(st.integers(1, MAX_STEPS).map(str)),
    "--cfg-scale": sometimes(st.floats(1.0, MAX_CFG_SCALE).map(str)),
    "--image-size": sometimes(st.sampled_from(["8", "16", "32", "64"])),
    "--scheduler": sometimes(st.just("flow-euler")),
    "--dtype": sometimes(st.sampled_from(["fp32", "bf16", "fp16"])),
    "--ckpt": sometimes(st.just(str(DEFAULT_CKPT))),
    "--device": sometimes(st.just("cpu")),
    "--no-progress": sometimes(st.just(True)),
    "--out": NEW_PATH,
    "--trace": sometimes(NEW_PATH),
}
CLI_PLANS = [  # valid plans for the digits model (4 heads, 64 tokens at 16 px)
    {}, {"--nproc": "2"}, {"--nproc": "2", "--ulysses": "2"}, {"--ring": "2"}, {"--nproc": "3", "--sp-impl": "fastseq"},
    {"--nproc": "2", "--cfg-parallel": True}, {"--nproc": "2", "--parallel": "auto"},
    {"--nproc": "4", "--ulysses": "2", "--ring": "2"}, {"--ring": "2", "--balance-tokens": True},
    {"--ulysses": "2", "--shard-weights": True, "--comm-dtype": "bf16"},
]  # fmt: skip
CLI_FUZZ = {
    "--classes": st.one_of(
        st.lists(INT_TOKEN, max_size=6),
        st.builds(lambda n, v: [v] * n, st.integers(MAX_CLASSES - 2, MAX_CLASSES + 60), INT_TOKEN),
    ),
    "--seed": st.one_of(INT_TOKEN, NEAR_SEED_MAX.map(str)),
    "--steps": INT_TOKEN,
    "--cfg-scale": FLOAT_TOKEN,
    "--image-size": INT_TOKEN,
    "--scheduler": st.one_of(st.sampled_from(["ddpm", "ddim", "heun", ""]), TEXT),
    "--dtype": st.one_of(st.just("fp8"), TEXT),
    "--model": st.one_of(st.sampled_from(["DiT-T/2", "DiT-XL/2", "DiT-Q/2"]), TEXT),
    "--ckpt": st.one_of(st.just("/"), NAME, TEXT),
    "--vae": TEXT,
    "--device": st.one_of(st.sampled_from(["cuda", "cuda:1", "cpu:0", "tpu"]), TEXT),
    "--nproc": INT_TOKEN,
    "--dp": INT_TOKEN,
    "--ulysses": INT_TOKEN,
    "--ring": INT_TOKEN,
    "--sp-impl": st.one_of(st.sampled_from(["auto", "ulysses", "ring", "usp", "fastseq", "warp"]), TEXT),
    "--comm-dtype": st.one_of(st.sampled_from(["bf16", "fp16", "fp32"]), TEXT),
    "--parallel": st.one_of(st.sampled_from(["default", "auto", "best"]), TEXT),
    **{switch: st.just(True) for switch in SWITCHES},
    "--out": PATHS,
    "--trace": st.one_of(st.just(ABSENT), PATHS),
}


def expected_plan(flags: dict) -> ParallelConfig | None:
    """The ParallelConfig the flags ask for (cli.parallel_config's rule), from the tokens themselves."""
    degrees = {dim: int(flags[f"--{dim}"]) for dim in ("dp", "ulysses", "ring") if f"--{dim}" in flags}
    plan = ParallelConfig(
        **degrees,
        cfg=2 if "--cfg-parallel" in flags else 1,
        sp_impl=flags.get("--sp-impl", "auto"),
        shard_weights="--shard-weights" in flags,
        comm_dtype=flags.get("--comm-dtype"),
        balance_tokens="--balance-tokens" in flags,
    )
    return None if not degrees and plan == ParallelConfig() else plan


def check_cli_job(job, flags: dict) -> None:
    """A valid request holds exactly what the command line said (as argparse's int/float read the tokens)."""
    call, engine = job.call, job.engine
    number = {"--seed": int, "--steps": int, "--image-size": int, "--nproc": int, "--cfg-scale": float}
    want = {name: number.get(name, lambda x: x)(token) for name, token in flags.items() if name != "--classes"}
    fields = ("--seed", "--steps", "--cfg-scale", "--image-size", "--scheduler", "--out", "--trace")
    assert [call.seed, call.steps, call.cfg_scale, call.image_size, call.scheduler, call.out, call.trace] == [
        want.get(name, 0 if name == "--seed" else None) for name in fields
    ]
    fields = ("--model", "--ckpt", "--device", "--vae", "--nproc", "--image-size")
    assert [engine.model, engine.ckpt, engine.device, engine.vae, engine.nproc, engine.image_size] == [
        want.get(name) for name in fields
    ]
    assert call.classes == [int(c) for c in flags.get("--classes", range(10))]
    assert engine.dtype == want.get("--dtype", "fp32") and engine.parallel_auto == (want.get("--parallel") == "auto")
    assert engine.progress == ("--no-progress" not in flags) and engine.plan() == expected_plan(flags)
    assert_in_bounds(call, job.steps, job.cfg_scale, job.config)
    assert Path(call.out).is_dir() and (call.trace is None or Path(call.trace).parent.is_dir())  # made before compute


def command_line(flags: dict) -> list[str]:
    argv = ["sample"]
    for name, token in flags.items():
        argv += [name] if token is True else [name, *token] if isinstance(token, list) else [name, token]
    return argv


@pytest.mark.parametrize("focus", sorted(CLI_FUZZ))
@FUZZ
@given(data=st.data())
def test_cli_sample_gives_a_valid_request_or_one_error_line(root, focus, data):
    flags = data.draw(perturbed(focus, CLI_VALID, CLI_FUZZ, CLI_PLANS))
    flags["--out"] = place(flags["--out"], root)  # always given: the default (./outputs) is not the fuzz's to make
    if "--trace" in flags:
        flags["--trace"] = place(flags["--trace"], root, ".json")
    jobs = []
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        patch.setattr(opendit.cli, "execute_sample", lambda args, job: jobs.append(job) or 0)  # validation only
        code = timed(lambda: opendit.cli.main(command_line(flags)))
    if code == 0:
        event("valid")
        assert len(jobs) == 1 and not stderr.getvalue()
        check_cli_job(jobs[0], flags)
    else:
        err = stderr.getvalue()
        event(f"error: {err.split(' ')[1] if ' ' in err else err}")
        assert code == 2 and not jobs and not stdout.getvalue(), (code, err)
        assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err


# ------------------------------------------------------------------------------------------------ the Python API
class Stopped(Exception):
    """Raised by the stub pool with the engine's spec: it was validated and would now start its workers."""


class FakeReplica:
    """Stands in for worker.Replica (no weights): records the spec and every call it would have sampled."""

    last = None  # the latest instance

    def __init__(self, spec):
        self.spec, self.calls = spec, []
        FakeReplica.last = self

    def run(self, call, on_step=None):
        self.calls.append(call)
        images = np.zeros((len(call.classes), 1, 1, 1), np.uint8)
        return GenerationResult(images=images, labels=list(call.classes), record={"timing": {}})

    def close(self):
        pass


@contextlib.contextmanager
def no_compute():
    def pool(self, fn, world, args, *rest, **kwargs):
        raise Stopped(args[0])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(opendit.engine.executors, "Replica", FakeReplica)  # the in-process executor builds it
        patch.setattr(opendit.distributed.launch.WorkerPool, "__init__", pool)
        yield


def same(got, given) -> bool:
    """`got` is what was given, not a conversion of it: an int for an integer (numpy's included), a float for a
    number, the very value otherwise (so True is never read as 1, nor "3" or 3.0 as 3)."""
    if isinstance(given, bool) or not isinstance(given, numbers.Number):
        return type(got) is type(given) and got == given
    if isinstance(given, numbers.Integral) and type(got) is int:
        return got == given
    return type(got) is float and got == given  # an integer given for a float field reads as the same float


def expected_classes(classes):
    if isinstance(classes, numbers.Integral) and not isinstance(classes, bool):
        return [int(classes)]  # Engine.generate's one-image shorthand
    return classes.tolist() if isinstance(classes, np.ndarray) else list(classes)


CALL_VALID = {
    "classes": st.one_of(
        st.lists(st.integers(0, 9), min_size=1, max_size=12),
        st.tuples(st.integers(0, 9), st.integers(0, 9)),
        st.builds(range, st.integers(1, 10)),
        st.builds(np.array, st.lists(st.integers(0, 9), min_size=1, max_size=5)),
        st.integers(0, 9),
    ),
    "seed": sometimes(st.one_of(st.integers(0, SEED_MAX - 16), st.just(np.int64(5)))),
    "steps": sometimes(st.integers(1, MAX_STEPS)),
    "cfg_scale": sometimes(st.one_of(st.floats(1.0, MAX_CFG_SCALE), st.integers(1, 100))),
    "scheduler": sometimes(st.just("flow-euler")),
    "image_size": sometimes(st.sampled_from([2, 8, 16, 32, 64])),
    "trace": sometimes(NEW_PATH),
}
CALL_FUZZ = {
    "classes": st.one_of(
        st.lists(INTS, max_size=12),
        st.lists(ODD, min_size=1, max_size=4),
        st.sampled_from([range(MAX_CLASSES + 1), range(10**12), range(0)]),
        st.builds(lambda n, v: [v] * n, st.integers(MAX_CLASSES - 2, MAX_CLASSES + 60), st.integers(0, 9)),
        st.builds(lambda a: np.array(a, dtype=float), st.lists(st.integers(0, 9), min_size=1, max_size=5)),
        ODD,
    ),
    "seed": st.one_of(INTS, NEAR_SEED_MAX, ODD),
    "steps": st.one_of(INTS, ODD),
    "cfg_scale": st.one_of(FLOATS, INTS, ODD),
    "scheduler": st.one_of(st.sampled_from(["ddim", "heun"]), TEXT, ODD),
    "image_size": st.one_of(st.sampled_from([15, 0, -16]), INTS, ODD),
    "trace": st.one_of(PATHS, ODD),
}


@pytest.fixture(scope="module")
def stub_engine(root):
    """An in-process opendit.Engine on the digits model whose replica is a FakeReplica."""
    with no_compute():  # only while constructing: the engine keeps its FakeReplica, later tests get the real one
        engine = opendit.Engine()
    yield engine
    engine.close()


def placed(values: dict, root: Path) -> dict:
    """The values with a generated path spec for the trace turned into a path under the fuzz root."""
    spec = values.get("trace")
    is_spec = isinstance(spec, tuple) and len(spec) == 3 and spec[0] in PATH_KINDS
    return {**values, "trace": place(spec, root, ".json")} if is_spec else values


@pytest.mark.parametrize("focus", sorted(CALL_FUZZ))
@FUZZ
@given(data=st.data())
def test_engine_generate_builds_the_call_asked_for_or_one_error(root, stub_engine, focus, data):
    values = placed(data.draw(perturbed(focus, CALL_VALID, CALL_FUZZ)), root)
    classes = values.pop("classes")
    replica = stub_engine._executor.replica
    before = len(replica.calls)
    try:
        timed(lambda: stub_engine.generate(classes, **values))
    except OpenDiTError as exc:
        assert_one_line(str(exc))
        assert len(replica.calls) == before  # nothing was sent
        return
    event("valid")
    call, defaults, spec = replica.calls[-1], stub_engine.spec.defaults, stub_engine.spec
    assert_in_bounds(call, call.steps, call.cfg_scale, call.config)
    assert call.classes == expected_classes(classes) and all(type(c) is int for c in call.classes)
    for name in ("seed", "steps", "cfg_scale", "scheduler"):
        given = values.get(name)
        assert same(getattr(call, name), given if given is not None else defaults.get(name, 0)), name
    size = values.get("image_size")
    assert call.config.image_size == ((size, size) if size is not None else spec.config.image_size)
    assert call.trace == (os.path.abspath(values["trace"]) if values.get("trace") is not None else None)
    assert not stub_engine.closed  # the engine stays usable


ENGINE_VALID = {
    "model": sometimes(st.just("DiT-T/2")),
    "ckpt": sometimes(st.sampled_from([DEFAULT_CKPT, str(DEFAULT_CKPT)])),
    "dtype": sometimes(st.sampled_from(["fp32", "bf16", "fp16"])),
    "device": sometimes(st.just("cpu")),
    "image_size": sometimes(st.sampled_from([8, 16, 32, 64])),
    "progress": sometimes(st.booleans()),
}
ENGINE_PLANS = [
    {}, {"nproc": 1}, {"nproc": 2}, {"nproc": 2, "parallel": ParallelConfig(ulysses=2)},
    {"parallel": ParallelConfig(ring=2)}, {"nproc": 2, "parallel_auto": True},
    {"nproc": 3, "parallel": ParallelConfig(sp_impl="fastseq")},
    {"parallel": ParallelConfig(ulysses=2, shard_weights=True, comm_dtype="fp16")},
]  # fmt: skip
PLANS = st.builds(
    ParallelConfig,
    dp=st.one_of(st.integers(1, 2), INTS, ODD), cfg=st.one_of(st.integers(1, 2), INTS),
    ulysses=st.one_of(st.sampled_from([1, 2, 4]), INTS), ring=st.one_of(st.integers(1, 2), INTS),
    sp_impl=st.one_of(st.sampled_from(["auto", "ulysses", "ring", "fastseq", "usp"]), TEXT),
    comm_dtype=st.one_of(st.none(), st.sampled_from(["bf16", "fp16"]), TEXT), balance_tokens=st.booleans(),
    shard_weights=st.one_of(st.booleans(), ODD), token_shares=st.one_of(st.none(), st.tuples(FLOATS, FLOATS)),
)  # fmt: skip
ENGINE_FUZZ = {
    "model": st.one_of(st.sampled_from(["DiT-D/2", "DiT-XL/2", "DiT-Q/2"]), TEXT, ODD),
    "ckpt": st.one_of(st.just("/"), NAME, ODD),
    "vae": st.one_of(NAME, ODD),
    "dtype": st.one_of(st.just(torch.float16), TEXT, ODD),
    "device": st.one_of(st.sampled_from(["cuda", "cuda:0", "meta"]), TEXT, ODD),
    "nproc": st.one_of(INTS, ODD),
    "parallel": st.one_of(PLANS, ODD),
    "parallel_auto": st.one_of(st.booleans(), ODD),
    "image_size": st.one_of(st.sampled_from([100, 15]), INTS, ODD),
    "progress": ODD,
}


def check_settings(settings, given: dict) -> None:
    """The engine's validated settings are exactly the arguments given (defaults for the others)."""
    defaults = {"model": None, "ckpt": None, "vae": None, "dtype": "fp32", "device": None, "nproc": None}
    defaults |= {"parallel_auto": False, "image_size": None}
    for name, default in defaults.items():
        value = given.get(name, default)
        assert same(getattr(settings, name), os.fspath(value) if isinstance(value, Path) else value), name
    assert settings.plan() == given.get("parallel")


@pytest.mark.parametrize("focus", sorted(ENGINE_FUZZ))
@FUZZ
@given(data=st.data())
def test_engine_constructor_validates_every_setting_or_gives_one_error(root, focus, data):
    values = data.draw(perturbed(focus, ENGINE_VALID, ENGINE_FUZZ, ENGINE_PLANS))
    with no_compute():
        try:
            engine = timed(lambda: opendit.Engine(**values))
        except OpenDiTError as exc:
            assert_one_line(str(exc))
            return
        except Stopped as stopped:  # world > 1: validated, about to start the workers
            event("valid (nproc > 1)")
            spec = stopped.args[0]
        else:
            event("valid")
            spec = engine.spec
            engine.close()
    check_settings(spec.settings, values)
    assert spec.world >= 1 and spec.plan.world_size == spec.world


ONE_SHOT_VALID = {**CALL_VALID, **ENGINE_VALID}
ONE_SHOT_FUZZ = {**CALL_FUZZ, **ENGINE_FUZZ, "sead": st.integers()}  # and a misspelt field


@pytest.mark.parametrize("focus", sorted(ONE_SHOT_FUZZ))
@FUZZ
@given(data=st.data())
def test_one_shot_generate_runs_what_was_asked_or_gives_one_error(root, focus, data):
    values = placed(data.draw(perturbed(focus, ONE_SHOT_VALID, ONE_SHOT_FUZZ, ENGINE_PLANS)), root)
    with no_compute():
        FakeReplica.last = None
        try:
            result = timed(lambda: opendit.generate(**values))
        except OpenDiTError as exc:
            assert_one_line(str(exc))
            return
        except Stopped as stopped:
            event("valid (nproc > 1)")
            check_settings(stopped.args[0].settings, values)  # validated, about to start the workers
            return
    event("valid")
    assert "sead" not in values
    call = FakeReplica.last.calls[-1]
    assert_in_bounds(call, call.steps, call.cfg_scale, call.config)
    assert call.classes == expected_classes(values["classes"]) and same(call.seed, values.get("seed", 0))
    assert result.record["request"]["seed"] == values.get("seed", 0)
    for name in ("steps", "cfg_scale", "scheduler"):
        if values.get(name) is not None:
            assert same(getattr(call, name), values[name]), name
    check_settings(FakeReplica.last.spec.settings, values)


@settings(FUZZ, max_examples=3 if FUZZ.max_examples > 10 else 2)
@given(
    classes=st.lists(st.integers(0, 9), min_size=1, max_size=3),
    seed=st.integers(0, SEED_MAX - 3),
    cfg_scale=st.one_of(st.none(), st.floats(1.0, 5.0)),
    image_size=st.sampled_from([None, 8, 16]),
)
def test_valid_generated_requests_run_for_real(root, classes, seed, cfg_scale, image_size):
    result = opendit.generate(classes=classes, seed=seed, steps=2, cfg_scale=cfg_scale, image_size=image_size)
    size = image_size or 16
    assert result.images.shape == (len(classes), size, size, 1) and result.images.dtype == np.uint8
    assert result.record["resolved"]["steps"] == 2 and result.record["request"]["seed"] == seed
    assert len(result.record["timing"]["per_step_s"]) == 2
