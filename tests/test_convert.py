"""`opendit convert`: official DiT .pt / training checkpoints -> our .safetensors + .json, streamed.

The streaming writer is checked against the safetensors library (every tensor read back bitwise), conversions against
load_model of the source (same weights, same forward), the refusals for their one-line messages, and the peak
resident memory of a conversion against one tensor's bytes (in a fresh subprocess, as tests/test_loading_memory.py).
"""

import json
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from opendit.cli import Parser
from opendit.cli.convert import add_convert_parser
from opendit.errors import OpenDiTError
from opendit.io.checkpoint import load_model, save_safetensors
from opendit.io.convert import convert_checkpoint, write_safetensors_streaming
from opendit.models.dit import DiTConfig, build_dit, pixel_config, preset

OFFICIAL = preset("DiT-T/2").with_image_size(64)  # 4x4 latent tokens of a latent DiT-T/2: 1 MB of fp32


def random_model(config: DiTConfig, seed: int = 0):
    """Random values everywhere (the DiT init zeroes the adaLN and output layers: a forward would compare zeros)."""
    model = build_dit(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model.eval()


def forward(model):
    cfg = model.config
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, *cfg.input_size, generator=generator)
    with torch.no_grad():
        return model(x, torch.tensor([10.0, 500.0]), torch.tensor([0, 1]))


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.fixture
def official_pt(tmp_path):
    """An official-format file: a raw state dict, no config anywhere."""
    model = random_model(OFFICIAL)
    path = tmp_path / "DiT-T-2-64x64.pt"
    torch.save(model.state_dict(), path)
    return path, model


def test_writer_round_trips_every_dtype_through_safetensors(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f64": torch.randn(3, 5, dtype=torch.float64, generator=gen),
        "f32": torch.randn(7, 3, generator=gen),
        "f16": torch.randn(4, 4, generator=gen).half(),
        "bf16": torch.randn(9, generator=gen).bfloat16(),
        "i64": torch.arange(-5, 5),
        "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "i16": torch.tensor([-300, 7], dtype=torch.int16),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "strided": torch.randn(6, 4, generator=gen).t(),  # not contiguous
    }
    path = tmp_path / "all.safetensors"
    entries = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    size = write_safetensors_streaming(path, entries, tensors.__getitem__, {"note": "hi"}, chunk_bytes=8)
    assert size == path.stat().st_size and not (tmp_path / "all.safetensors.tmp").exists()
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0  # padded: the data starts 8-byte aligned
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    with safe_open(path, "pt") as handle:
        assert handle.metadata() == {"note": "hi"}


def test_writer_casts_chunkwise_and_leaves_nothing_on_failure(tmp_path):
    source = {"a": torch.randn(1000), "b": torch.randn(10, 10)}
    path = tmp_path / "cast.safetensors"
    write_safetensors_streaming(path, [("a", (1000,), torch.bfloat16), ("b", (10, 10), torch.float16)],
                                source.__getitem__, chunk_bytes=64)  # fmt: skip
    loaded = load_file(path)
    assert torch.equal(loaded["a"], source["a"].bfloat16()) and torch.equal(loaded["b"], source["b"].half())

    def failing(name):
        if name == "b":
            raise RuntimeError("disk gone")
        return source[name]

    bad = tmp_path / "bad.safetensors"
    with pytest.raises(RuntimeError, match="disk gone"):
        write_safetensors_streaming(bad, [("a", (1000,), torch.float32), ("b", (10, 10), torch.float32)], failing)
    assert list(tmp_path.iterdir()) == [path]  # no bad.safetensors, no bad.safetensors.tmp


def test_official_pt_converts_bitwise_and_samples_the_same(official_pt, tmp_path):
    path, model = official_pt
    out = tmp_path / "ours" / "dit-t.safetensors"
    summary = convert_checkpoint(path, out)
    assert summary["preset"] == "DiT-T/2" and summary["inferred"] and summary["image_size"] == (64, 64)
    assert summary["tensors"] == len(model.state_dict()) and summary["bytes"] == out.stat().st_size
    loaded = load_file(out)
    assert set(loaded) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    meta = json.loads(out.with_suffix(".json").read_text())
    assert DiTConfig.from_dict(meta["model"]) == OFFICIAL
    assert meta["scheduler"] == "ddim" and meta["steps"] == 30 and meta["cfg_scale"] == 3.0
    ours, theirs = load_model(OFFICIAL, out), load_model(OFFICIAL, path)
    assert_same_weights(ours, theirs)
    assert torch.equal(forward(ours), forward(theirs))


def test_shapes_decide_classes_channels_and_grid(tmp_path):
    """A bare state dict of a preset with 10 classes at 128 px: the config follows the tensors, not the preset."""
    config = replace(preset("DiT-T/4"), num_classes=10).with_image_size(128)
    path = tmp_path / "t4.pt"
    torch.save(random_model(config).state_dict(), path)
    summary = convert_checkpoint(path, tmp_path / "t4.safetensors")
    assert DiTConfig.from_dict(summary["config"]) == config and summary["preset"] == "DiT-T/4"
    explicit = convert_checkpoint(path, tmp_path / "t4b.safetensors", model="DiT-T/4", image_size=128)
    assert explicit["config"] == summary["config"] and not explicit["inferred"]


def test_bf16_target_and_safetensors_source(official_pt, tmp_path):
    path, _ = official_pt
    out = tmp_path / "bf16.safetensors"
    summary = convert_checkpoint(path, out, dtype="bf16")
    assert summary["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(out).values())
    assert_same_weights(
        load_model(OFFICIAL, out, dtype=torch.bfloat16), load_model(OFFICIAL, path, dtype=torch.bfloat16)
    )
    # our own format in, fp16 out: the sidecar's config is carried, tensors are read on demand
    again = convert_checkpoint(out, tmp_path / "fp16.safetensors", dtype="fp16")
    assert again["config"] == summary["config"] and not again["inferred"]
    expected = {k: v.half() for k, v in load_file(out).items()}
    assert all(torch.equal(load_file(tmp_path / "fp16.safetensors")[k], v) for k, v in expected.items())


def training_checkpoint(path, config):
    """What trainer.save_checkpoint writes: model, ema, opt, step, elapsed_s, args, model_config, rng."""
    model, ema = random_model(config, seed=1), random_model(config, seed=2)
    opt = torch.optim.AdamW(model.parameters())
    torch.save(
        {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "opt": opt.state_dict(),
            "step": 10,
            "elapsed_s": 1.0,
            "args": {"model": "DiT-T/2", "image_size": 16},
            "model_config": config.to_dict(),
            "rng": {"torch": torch.get_rng_state()},
        },
        path,
    )
    return model, ema


def test_training_checkpoint_converts_with_its_own_config(tmp_path):
    config = pixel_config("DiT-T/2", 16)  # pixel space, 1 channel, 10 classes, flow: nothing a preset would guess
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    model, ema = training_checkpoint(run / "checkpoints" / "latest.pt", config)
    out = tmp_path / "ema.safetensors"
    summary = convert_checkpoint(run, out, dtype="bf16")  # a run directory: its checkpoints/latest.pt
    assert DiTConfig.from_dict(summary["config"]) == config and not summary["inferred"]
    meta = json.loads(out.with_suffix(".json").read_text())
    assert DiTConfig.from_dict(meta["model"]) == config and meta["scheduler"] == "flow-euler"
    loaded = load_file(out)
    assert all(torch.equal(loaded[k], v.bfloat16()) for k, v in ema.state_dict().items())
    raw = convert_checkpoint(run, tmp_path / "raw.safetensors", use="model")
    assert_same_weights(load_model(config, raw["path"]), load_model(config, run, use="model"))
    assert_same_weights(load_model(config, raw["path"]), model)
    with pytest.raises(OpenDiTError, match="carries its own config.*drop --model"):
        convert_checkpoint(run, tmp_path / "x.safetensors", model="DiT-S/2")


def test_refusals_are_one_line_with_the_fix(official_pt, tmp_path):
    path, _ = official_pt
    out = tmp_path / "o.safetensors"
    convert_checkpoint(path, out)
    with pytest.raises(OpenDiTError, match="already exists; pass --force"):
        convert_checkpoint(path, out)
    assert convert_checkpoint(path, out, force=True)["path"] == out
    with pytest.raises(OpenDiTError, match=r"must end in \.safetensors.*pass .*o2\.safetensors"):
        convert_checkpoint(path, tmp_path / "o2.pt")
    with pytest.raises(OpenDiTError, match="is the checkpoint being converted"):
        convert_checkpoint(out, out, force=True)
    other = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(OpenDiTError, match="no DiT weights.*pass an official DiT"):
        convert_checkpoint(other, tmp_path / "r.safetensors")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(OpenDiTError, match="truncated, corrupt.*download an intact"):
        convert_checkpoint(cut, tmp_path / "c.safetensors")
    odd = tmp_path / "odd.pt"
    torch.save(random_model(DiTConfig(depth=1, hidden_size=32, num_heads=2, patch_size=2)).state_dict(), odd)
    with pytest.raises(OpenDiTError, match="matches no preset; pass --model"):
        convert_checkpoint(odd, tmp_path / "d.safetensors")
    with pytest.raises(OpenDiTError, match="hidden_size expected 384 found 64.*pass --model DiT-T/2"):
        convert_checkpoint(path, tmp_path / "d.safetensors", model="DiT-S/2")  # names the right preset
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["DiT-T-2-64x64.pt", "o.safetensors", "o.json", "resnet.pt", "cut.pt", "odd.pt"]
    )


def test_cli_parser_runs_the_conversion(official_pt, tmp_path, capsys):
    path, _ = official_pt
    parser = Parser(prog="opendit")
    add_convert_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli.safetensors"
    args = parser.parse_args(["convert", str(path), str(out), "--dtype", "bf16", "--use", "ema"])
    assert args.func(args) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and line.startswith(f"wrote {out}") and "32 tensors" in line and "bfloat16" in line
    assert "DiT-T/2 (preset inferred" in line
    with pytest.raises(OpenDiTError, match="invalid choice"):
        parser.parse_args(["convert", str(path), str(out), "--use", "best"])
    with pytest.raises(OpenDiTError, match="invalid choice"):
        parser.parse_args(["convert", str(path), str(out), "--dtype", "fp8"])


def test_an_output_folder_is_made_or_refused_in_one_line(official_pt, tmp_path):
    path, _ = official_pt
    deep = tmp_path / "no" / "such" / "dir" / "x.safetensors"
    convert_checkpoint(path, deep)  # a missing folder is made, as `opendit sample --out` does
    assert deep.is_file() and deep.with_suffix(".json").is_file()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OpenDiTError, match=r"cannot create the output folder .*file/sub \(a file is in the way\)"):
        convert_checkpoint(path, blocker / "sub" / "x.safetensors")


def test_save_safetensors_output_is_a_valid_source(tmp_path):
    """Ours in, ours out (fp32 kept): the same bytes of every tensor as save_safetensors wrote."""
    model = random_model(OFFICIAL)
    src = save_safetensors(model, tmp_path / "src.safetensors", {"steps": 50})
    summary = convert_checkpoint(src, tmp_path / "dst.safetensors")
    assert json.loads((tmp_path / "dst.json").read_text())["steps"] == 50  # the source's own settings are kept
    a, b = load_file(src), load_file(summary["path"])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


_PROBE = textwrap.dedent(
    """
    import json, sys
    from opendit.observe.memory import exact_malloc, peak_rss_bytes, reset_peak_rss, rss_bytes
    exact_malloc()  # freed tensors leave the resident set at once
    import torch
    from opendit.io.convert import convert_checkpoint
    from opendit.models.dit import DiTConfig, build_dit
    build_dit(DiTConfig.from_dict(json.load(open(sys.argv[2]))["model"]), device="meta")  # lazy imports of meta init
    result = {}
    for dtype in (None, "bf16"):
        base = rss_bytes()
        reset_peak_rss()
        summary = convert_checkpoint(sys.argv[1], sys.argv[3] + f"-{dtype}.safetensors", dtype=dtype)
        result[str(dtype)] = {"base": base, "peak": peak_rss_bytes(), "seconds": summary["seconds"]}
    print(json.dumps(result))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS/VmHWM from /proc")
@pytest.mark.slow
def test_conversion_peak_is_one_tensor_not_the_model(tmp_path):
    """~200 MB of fp32 (4 blocks of width 768; the largest tensor, an 8192-class embedding, is 1/8 of it) converted in
    a fresh process: the peak resident set beyond the baseline stays within the largest tensor + 16 MiB."""
    config = DiTConfig(depth=4, hidden_size=768, num_heads=12, patch_size=2, num_classes=8191)
    model = build_dit(config, device="meta").to_empty(device="cpu")
    for tensor in model.state_dict().values():
        tensor.fill_(0.01)
    path = tmp_path / "big.pt"
    torch.save(model.state_dict(), path)
    sizes = [t.numel() * t.element_size() for t in model.state_dict().values()]
    del model
    path.with_suffix(".json").write_text(json.dumps({"model": config.to_dict()}))  # a bare .pt + our sidecar
    total, largest = sum(sizes), max(sizes)
    assert 7 <= total / largest <= 9
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(path), str(path.with_suffix(".json")), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for dtype, run in result.items():
        extra = run["peak"] - run["base"]
        message = (
            f"{dtype}: peak {extra / 2**20:.1f} MiB over the baseline {run['base'] / 2**20:.0f} MiB; largest tensor "
            f"{largest / 2**20:.1f} MiB, file {total / 2**20:.1f} MiB, {run['seconds']:.2f} s"
        )
        print(message)
        assert extra <= largest + (16 << 20), message
    assert load_file(tmp_path / "out-None.safetensors")["y_embedder.embedding_table.weight"].eq(0.01).all()
