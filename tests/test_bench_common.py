"""The benchmarks stay runnable and tidy without running them (they time real forwards; see docs/benchmarks.md):
every script imports, no script imports another benchmark script (only benchmarks/common.py), every `opendit`
module and name a script imports exists (also the lazy, in-function imports: a moved module shows up here, not at the
next benchmark run), each benchmark keeps one current result (NAME.json + .md + .png, no variants), and the shared
report writer writes JSON + Markdown + PNG."""

from __future__ import annotations

import ast
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
SCRIPTS = sorted(p for p in BENCH.glob("*.py"))
NAMES = {p.stem for p in SCRIPTS}
# results written by something other than a benchmark script of the same name
OTHER_RESULTS = {"video_quality": "`opendit eval --video` (the bundled video model's quality, docs/models.md)"}


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in a file, at any depth (lazy imports included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return out


def test_there_are_benchmarks_and_a_common_module():
    assert "common" in NAMES and len(NAMES) > 10, NAMES


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_script_imports_another_benchmark_script(script):
    others = NAMES - {"common", script.stem}
    bad = [f"line {line}: {module}" for line, module, _ in imports(script) if module.split(".")[0] in others]
    if script.stem == "common":
        bad += [f"line {line}: {module}" for line, module, _ in imports(script) if module.split(".")[0] in NAMES]
    assert not bad, f"{script.name} imports another benchmark script ({bad}); share code through common.py"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_opendit_import_exists(script):
    missing = []
    for line, module, names in imports(script):
        if module.split(".")[0] != "opendit":
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"line {line}: {module} ({exc})")
            continue
        for name in names:
            if not hasattr(mod, name) and importlib.util.find_spec(f"{module}.{name}") is None:
                missing.append(f"line {line}: {module}.{name}")
    assert not missing, f"{script.name}: stale imports {missing}"


@pytest.mark.slow  # a fresh interpreter per script
def test_every_script_imports():
    """All scripts imported in one fresh interpreter (the way they run: their folder on sys.path), none executed;
    first the public names of the README's tour (from opendit import Engine, ParallelConfig, parallelize, generate)."""
    code = (
        "import importlib, sys\n"
        f"sys.path[:0] = [{str(BENCH)!r}, {str(ROOT / 'src')!r}]\n"
        "from opendit import Engine, ParallelConfig, parallelize, generate  # the README's tour, fresh\n"
        f"for name in {sorted(NAMES)!r}:\n"
        "    importlib.import_module(name)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_each_benchmark_keeps_one_current_result():
    files = sorted(p for p in RESULTS.iterdir() if p.is_file())
    stems = {p.name.split(".", 1)[0] for p in files}
    strays = sorted(p.name for p in files if p.name.split(".", 1)[0] not in NAMES | set(OTHER_RESULTS))
    assert not strays, f"result files of no benchmark (variants? keep one current result per benchmark): {strays}"
    variants = sorted(p.name for p in files if p.name.count(".") != 1)
    assert not variants, f"variant result files (NAME.json/.md/.png only): {variants}"
    for stem in stems - set(OTHER_RESULTS):
        for suffix in (".json", ".md", ".png"):
            assert (RESULTS / f"{stem}{suffix}").is_file(), f"{stem}: no {stem}{suffix} (re-render with --render)"


@pytest.fixture()
def common():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("common")
    finally:
        sys.path.remove(str(BENCH))


def test_report_writer_writes_json_markdown_and_png(common, tmp_path):
    result = {"meta": {"what": "toy"}, "rows": [{"setting": "a", "s": 1.5}, {"setting": "b", "s": 0.75}]}
    md = common.markdown_table(["setting", "s"], [[r["setting"], r["s"]] for r in result["rows"]])
    paths = common.write_report(tmp_path / "toy.json", result, md)  # a suffix is dropped: toy.{json,md,png}
    assert {p.name for p in paths.values()} == {"toy.json", "toy.md", "toy.png"}
    assert json.loads(paths["json"].read_text()) == result
    assert paths["md"].read_text() == md + "\n" and "| b | 0.75 |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def plot(path):
        common.bar_plot(path, ["a", "b"], {"s": [1.5, 0.75], "none": [None, 1.0]}, "s", "toy", log=True)

    paths = common.write_report(tmp_path / "sub" / "plotted", result, md, plot=plot)
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_shared_helpers(common):
    import torch

    a = torch.tensor([[0.0, 0.5], [-0.5, 1.0]])
    assert common.psnr(a, a) == float("inf")
    assert common.psnr(a + 0.1, a, clamp=False) == pytest.approx(20 * math.log10(2 / 0.1), abs=1e-4)
    assert common.rel_err(a + 0.01, a) == pytest.approx(0.01)
    assert common.PLANS["ring"] == {"ring": 2}
    assert common.xl_width_config(1024, 2).depth == 2


@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.stem != "common"], ids=lambda p: p.name)
def test_every_script_writes_through_the_report_writer_and_rerenders(script):
    text = script.read_text()
    assert "render_only(" in text, f"{script.name}: no --render (re-render its result from the JSON, no measurement)"
    assert "finish(" in text or "write_report(" in text, f"{script.name}: write through common.finish/write_report"


def test_render_option_rewrites_from_the_json(common, tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    common.report_args(parser, "toy")
    assert parser.parse_args([]).out.endswith("toy") and parser.parse_args([]).render is None
    result = {"rows": [{"setting": "a", "s": 1.0}]}
    paths = common.write_report(tmp_path / "toy", result, "| setting | s |\n|---|---|\n| a | 1.0 |")
    before = paths["json"].stat().st_mtime_ns
    seen = []

    def render(got, path):
        seen.append((got, path))
        return common.finish(path, got, "| setting | s |\n|---|---|\n| a | 1.00 |")

    assert common.render_only(parser.parse_args(["--from-json", str(paths["json"])]), render)
    assert seen == [(result, paths["json"])]
    assert paths["md"].read_text().endswith("| a | 1.00 |\n")
    assert paths["json"].stat().st_mtime_ns == before  # the measured JSON is left as it was
    assert not common.render_only(parser.parse_args([]), render)
