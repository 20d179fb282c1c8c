"""The video DiT: the official Latte checkpoint layout loads strict, the forward is Latte's (an independent reference
written here from Latte's models/latte.py semantics, in its (N, F, C, H, W) layout), and `opendit sample --video`
runs a Latte-layout checkpoint with a VAE and the digits video model, with clear errors for bad input."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from opendit.cli import main as cli_main
from opendit.errors import OpenDiTError
from opendit.models.dit import perturb_weights
from opendit.models.video_dit import VideoDiT, VideoDiTConfig, build_video_dit, pixel_video_config, preset


def latte_state_shapes(depth, hidden, patch, in_ch, frames, positions, classes, learn_sigma=True) -> dict:
    """Every tensor of Latte(extras=2) by name and shape, listed from its constructor (not from our model)."""
    out_ch = 2 * in_ch if learn_sigma else in_ch
    shapes = {
        "pos_embed": (1, positions, hidden),
        "temp_embed": (1, frames, hidden),
        "x_embedder.proj.weight": (hidden, in_ch, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (classes + 1, hidden),
        "final_layer.linear.weight": (patch * patch * out_ch, hidden),
        "final_layer.linear.bias": (patch * patch * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        for name, shape in {
            "attn.qkv.weight": (3 * hidden, hidden),
            "attn.qkv.bias": (3 * hidden,),
            "attn.proj.weight": (hidden, hidden),
            "attn.proj.bias": (hidden,),
            "mlp.fc1.weight": (4 * hidden, hidden),
            "mlp.fc1.bias": (4 * hidden,),
            "mlp.fc2.weight": (hidden, 4 * hidden),
            "mlp.fc2.bias": (hidden,),
            "adaLN_modulation.1.weight": (6 * hidden, hidden),
            "adaLN_modulation.1.bias": (6 * hidden,),
        }.items():
            shapes[f"blocks.{i}.{name}"] = shape
    return shapes


def test_latte_xl_layout_loads_strict():
    config = preset("Latte-XL/2")  # 28 blocks, hidden 1152, 16 heads, 16 frames, 32x32 latents, UCF-101
    shapes = latte_state_shapes(28, 1152, 2, 4, 16, 256, 101)
    model = build_video_dit(config, device="meta")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert config.image_size == (256, 256) and config.depth == 28 and config.num_heads == 16


def _sincos_1d(dim, pos):
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def latte_reference(model: VideoDiT, x_nfchw, t, y):
    """Latte's forward (models/latte.py, extras=2) on the same parameters, in Latte's layout."""
    cfg, p = model.config, model.config.patch_size
    n, f, c, h, w = x_nfchw.shape
    sd = {k: v.double() for k, v in model.state_dict().items()}
    x = x_nfchw.double().reshape(n * f, c, h, w)
    x = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    x = x + sd["pos_embed"]  # (n f) t d
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs[None]
    temb = torch.cat([args.cos(), args.sin()], dim=-1)
    temb = F.linear(F.silu(F.linear(temb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])  # fmt: skip
    cond = temb + sd["y_embedder.embedding_table.weight"][y]
    tokens = x.shape[1]

    def block(i, x, c):
        pre = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[pre + "adaLN_modulation.1.weight"], sd[pre + "adaLN_modulation.1.bias"])
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
        b, s, d = x.shape
        hdim = d // cfg.num_heads
        z = F.layer_norm(x, (d,), eps=1e-6) * (1 + sc1[:, None]) + sh1[:, None]
        qkv = F.linear(z, sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"]).reshape(b, s, 3, cfg.num_heads, hdim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(hdim)).softmax(-1) @ v
        x = x + g1[:, None] * F.linear(att.transpose(1, 2).reshape(b, s, d), sd[pre + "attn.proj.weight"],
                                       sd[pre + "attn.proj.bias"])  # fmt: skip
        z = F.layer_norm(x, (d,), eps=1e-6) * (1 + sc2[:, None]) + sh2[:, None]
        z = F.linear(F.gelu(F.linear(z, sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"]), approximate="tanh"),
                     sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])  # fmt: skip
        return x + g2[:, None] * z

    c_spatial, c_temp = cond.repeat_interleave(f, 0), cond.repeat_interleave(tokens, 0)
    for i in range(0, cfg.depth, 2):
        x = block(i, x, c_spatial)
        x = x.reshape(n, f, tokens, -1).transpose(1, 2).reshape(n * tokens, f, -1)  # (b f) t d -> (b t) f d
        if i == 0:
            x = x + sd["temp_embed"]
        x = block(i + 1, x, c_temp)
        x = x.reshape(n, tokens, f, -1).transpose(1, 2).reshape(n * f, tokens, -1)  # back to (b f) t d
    mod = F.linear(
        F.silu(c_spatial), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"]
    )
    shift, scale = mod.chunk(2, dim=1)
    x = F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    x = F.linear(x, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])  # (n f, t, p p out)
    g = h // p
    out = x.reshape(n * f, g, g, p, p, cfg.out_channels).permute(0, 5, 1, 3, 2, 4).reshape(n * f, -1, h, w)
    return out.reshape(n, f, -1, h, w)


def test_forward_is_latte_and_the_fixed_tables_are_latte_sincos():
    config = VideoDiTConfig(depth=4, hidden_size=32, num_heads=4, patch_size=2, frames=3, input_size=(6, 6))
    torch.manual_seed(0)
    model = perturb_weights(build_video_dit(config), 0.05).eval()
    assert torch.allclose(model.temp_embed[0].double(), _sincos_1d(32, torch.arange(3)), atol=1e-6)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, config.in_channels, 6, 6, generator=gen)  # Latte's (N, F, C, H, W)
    t, y = torch.tensor([10.0, 700.0]), torch.tensor([4, 101])
    with torch.no_grad():
        ours = model(x.transpose(1, 2), t, y).transpose(1, 2)  # ours is channel-first
    ref = latte_reference(model, x, t, y)
    assert float((ours.double() - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.fixture(scope="module")
def latte_ckpt(tmp_path_factory):
    """A synthetic class-conditional Latte-S/2 checkpoint in the official layout: {"ema": state dict} in a .pt, with
    4 frames of 8x8 latents (sizes the loader must read from the tensors)."""
    shapes = latte_state_shapes(12, 384, 2, 4, 4, 16, 101)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
    path = tmp_path_factory.mktemp("latte") / "ucf101.pt"
    torch.save({"ema": state}, path)
    return path


def run(args, capsys):
    code = cli_main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sample_video_latte_checkpoint_with_vae(tmp_path, capsys, latte_ckpt, tiny_vae):
    from opendit.io.outputs import read_video_frames

    out = tmp_path / "out"
    args = ["sample", "--video", "--model", "Latte-S/2", "--ckpt", str(latte_ckpt), "--vae", str(tiny_vae),
            "--classes", "5", "--steps", "2", "--scheduler", "ddim", "--out", str(out), "--no-progress"]  # fmt: skip
    code, stdout, stderr = run(args, capsys)
    assert code == 0, stderr
    frames = read_video_frames(out / "000_class-5")
    assert frames.shape == (4, 64, 64, 3)  # 4 frames of 8x8 latents x 8
    assert (out / "000_class-5.gif").is_file() and (out / "samples.png").is_file() and (out / "record.json").is_file()
    code, _, stderr = run([*args, "--frames", "16"], capsys)
    assert code == 2 and "makes 4-frame videos" in stderr and "--frames 4" in stderr


@pytest.fixture(scope="module")
def digits_video_ckpt(tmp_path_factory):
    from opendit.io.checkpoint import save_safetensors

    config = replace(pixel_video_config("Latte-T/4", 16, 8), motion=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dv") / "dv"
    return save_safetensors(perturb_weights(build_video_dit(config), 0.05), path, {"steps": 3, "cfg_scale": 3.0})


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--motion", "sideways"], "unknown motion 'sideways'; choose from right, left, down, up"),
        (["--motion", "right", "up", "left"], "one direction for all classes or one per class (2)"),
        (["--frames", "16"], "makes 8-frame videos"),
    ],
)
def test_bad_video_requests_are_clear_errors(tmp_path, capsys, digits_video_ckpt, extra, message):
    args = ["sample", "--video", "--ckpt", str(digits_video_ckpt), "--classes", "3", "7", "--out", str(tmp_path)]
    code, _, stderr = run([*args, *extra], capsys)
    assert code == 2 and message in stderr and "Traceback" not in stderr


def test_video_flag_with_an_image_model_and_motion_without_video(tmp_path, capsys, digits_video_ckpt):
    code, _, stderr = run(["sample", "--video", "--model", "DiT-T/2", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--video needs a video model" in stderr
    code, _, stderr = run(
        ["sample", "--ckpt", str(digits_video_ckpt), "--classes", "1", "--out", str(tmp_path)], capsys
    )
    assert code == 2 and "is a video model: add --video" in stderr
    code, _, stderr = run(["sample", "--classes", "1", "--motion", "up", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--motion applies to --video only" in stderr


def test_motion_needs_a_motion_model():
    from opendit.api.video import motion_labels

    assert motion_labels([3, 7], ["right", "up"], replace(preset("Latte-T/2"), motion=True)) == [3, 37]
    assert motion_labels([3, 7], ["left"], replace(preset("Latte-T/2"), motion=True)) == [13, 17]
    with pytest.raises(OpenDiTError, match="--motion applies to the digits video model"):
        motion_labels([3], ["up"], preset("Latte-T/2"))


def test_eval_video_reports_accuracies_and_the_judge_on_real_videos(tmp_path, capsys, digits_video_ckpt):
    import json

    out = tmp_path / "report.json"
    args = [
        "eval",
        "--video",
        "--ckpt",
        str(digits_video_ckpt),
        "--per-condition",
        "1",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    code, _, stderr = run(args, capsys)
    assert code == 0, stderr
    report = json.loads(out.read_text())
    assert report["samples"]["total"] == 40 and len(report["per_condition"]["digit_accuracy"]) == 40
    assert 0 <= report["digit_accuracy"] <= 1 and 0 <= report["direction_accuracy"] <= 1
    assert report["judge_on_real"]["digit_accuracy"] >= 0.95  # the judge checked on real moving digits first
    assert report["model"] == str(digits_video_ckpt) and report["timing"]["sampling_s"] > 0
