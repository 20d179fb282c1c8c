"""`generate()`: conditions -> noise -> denoising loop -> decode -> images + a record. CLI and API both call it."""

import json
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from opendit.checkpoint import file_sha256, load_model, read_sidecar_config
from opendit.diffusion.sampler import sample
from opendit.errors import OpenDiTError
from opendit.models.dit import DiTConfig, preset
from opendit.precision import parse_dtype

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_CKPT = WEIGHTS_DIR / "digits.safetensors"
VAE_SCALE = 0.18215  # stabilityai/sd-vae-ft-* latent scaling used by DiT


@dataclass
class GenerationRequest:
    classes: list[int]
    model: str | None = None  # preset name; None with no ckpt -> the shipped digits model
    ckpt: str | None = None
    image_size: int | None = None  # pixels; None -> the model's own size
    steps: int | None = None
    scheduler: str | None = None
    cfg_scale: float | None = None
    seed: int = 0
    dtype: str = "fp32"
    vae: str | None = None
    device: str | None = None
    progress: bool = True


@dataclass
class GenerationResult:
    images: np.ndarray  # (B, H, W, C) uint8
    labels: list[int]
    record: dict = field(default_factory=dict)

    def pil_images(self) -> list[Image.Image]:
        return [Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img) for img in self.images]


def resolve_model(request: GenerationRequest) -> tuple[DiTConfig, str | None, dict, str | None]:
    """(config, checkpoint, sampling defaults, note) for a request: from presets, sidecar JSON or the shipped model."""
    defaults = {"steps": 50, "scheduler": None, "cfg_scale": 4.0}
    note = None
    ckpt = request.ckpt
    if request.model is None and ckpt is None:
        if DEFAULT_CKPT.is_file():
            ckpt = str(DEFAULT_CKPT)
        else:
            note = "no trained default model is installed: using a randomly initialised DiT-T/2 (images are noise)"
            config = DiTConfig(
                **{
                    **preset("DiT-T/2").to_dict(),
                    "input_size": (16, 16),
                    "in_channels": 1,
                    "num_classes": 10,
                    "learn_sigma": False,
                    "latent": False,
                    "prediction": "flow",
                }
            )
            return config, None, {**defaults, "scheduler": "flow-euler"}, note
    sidecar = read_sidecar_config(ckpt) if ckpt else None
    if sidecar is not None:
        config = DiTConfig.from_dict(sidecar["model"])
        if request.model is not None and preset(request.model).depth != config.depth:
            raise OpenDiTError(f"--model {request.model} does not match checkpoint {ckpt} (its config: {config})")
        defaults.update({k: sidecar[k] for k in ("steps", "scheduler", "cfg_scale") if k in sidecar})
    else:
        if request.model is None:
            raise OpenDiTError(f"checkpoint {ckpt} has no .json config beside it; pass --model (e.g. DiT-XL/2)")
        config = preset(request.model)
        if request.image_size is None:
            request.image_size = 256
    if request.image_size is not None:
        config = config.with_image_size(request.image_size)
    if defaults["scheduler"] is None:
        defaults["scheduler"] = "flow-euler" if config.prediction == "flow" else "ddpm"
    return config, ckpt, defaults, note


def decode(samples: torch.Tensor, config: DiTConfig, vae_path: str | None, device: torch.device) -> np.ndarray:
    """Model-space samples (B, C, h, w) -> uint8 images (B, H, W, C)."""
    if config.latent:
        if vae_path is None:
            raise OpenDiTError(
                "this is a latent model: pass --vae DIR (a local diffusers AutoencoderKL, e.g. sd-vae-ft-ema)"
            )
        from diffusers import AutoencoderKL

        try:
            vae = AutoencoderKL.from_pretrained(vae_path).to(device).eval()
        except Exception as exc:
            raise OpenDiTError(
                f"cannot load the VAE from {vae_path}: {exc}; pass a local AutoencoderKL folder"
            ) from exc
        with torch.no_grad():
            samples = vae.decode(samples.to(device) / VAE_SCALE).sample  # (B, 3, H, W) in [-1, 1]
    pixels = ((samples.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, C, H, W)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def generate(request: GenerationRequest | None = None, **kwargs) -> GenerationResult:
    """Generate one image per entry of `classes`. Keyword arguments are GenerationRequest fields."""
    request = request or GenerationRequest(**kwargs)
    if not request.classes:
        raise OpenDiTError("no classes given; pass e.g. --classes 0 1 2")
    device = torch.device(request.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(request.dtype)
    config, ckpt, defaults, note = resolve_model(request)
    steps = request.steps if request.steps is not None else defaults["steps"]
    scheduler = request.scheduler or defaults["scheduler"]
    cfg_scale = request.cfg_scale if request.cfg_scale is not None else defaults["cfg_scale"]
    if note and request.progress:
        print(f"note: {note}", file=sys.stderr)
    start = time.perf_counter()
    model = load_model(config, ckpt, device=device, dtype=dtype)
    load_time = time.perf_counter() - start
    labels = torch.tensor(request.classes, dtype=torch.long)
    result = sample(
        model,
        labels,
        (config.in_channels, *config.input_size),
        num_classes=config.num_classes,
        scheduler_name=scheduler,
        prediction=config.prediction,
        learn_sigma=config.learn_sigma,
        steps=steps,
        cfg_scale=cfg_scale,
        seed=request.seed,
        device=device,
        progress=request.progress,
    )
    images = decode(result.samples, config, request.vae, device)
    record = {
        "request": asdict(request),
        "resolved": {"steps": steps, "scheduler": scheduler, "cfg_scale": cfg_scale, "dtype": str(dtype)},
        "model": config.to_dict(),
        "checkpoint": ckpt,
        "checkpoint_sha256": file_sha256(ckpt) if ckpt else None,
        "note": note,
        "device": str(device),
        "timing": {
            "load_s": load_time,
            "sampling_s": sum(result.step_times),
            "per_step_s": result.step_times,
            "total_s": time.perf_counter() - start,
        },
        "peak_memory_bytes": peak_memory_bytes(device),
    }
    return GenerationResult(images=images, labels=list(request.classes), record=record)


def save_outputs(result: GenerationResult, out_dir: str | Path, label_names: list[str] | None = None) -> Path:
    """Write DIR/samples.png (a labelled grid), DIR/NNN_class-K.png per image and DIR/record.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = result.pil_images()
    for index, (img, label) in enumerate(zip(images, result.labels)):
        img.save(out / f"{index:03d}_class-{label}.png")
    labelled_grid(images, result.labels, label_names).save(out / "samples.png")
    (out / "record.json").write_text(json.dumps(result.record, indent=2, default=str))
    return out / "samples.png"


def labelled_grid(images: list[Image.Image], labels: list[int], names: list[str] | None = None) -> Image.Image:
    """Images (upscaled to at least 96 px, nearest) in a grid of up to 10 columns, each with its class printed above."""
    scale = max(1, -(-96 // max(images[0].size)))
    tile_w, tile_h = images[0].size[0] * scale, images[0].size[1] * scale
    caption, pad = 14, 4
    cols = min(10, len(images))
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * (tile_w + pad) + pad, rows * (tile_h + caption + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for index, (img, label) in enumerate(zip(images, labels)):
        x = pad + (index % cols) * (tile_w + pad)
        y = pad + (index // cols) * (tile_h + caption + pad)
        draw.text((x, y), names[label] if names else f"class {label}", fill="black")
        grid.paste(img.convert("RGB").resize((tile_w, tile_h), Image.NEAREST), (x, y + caption))
    return grid
