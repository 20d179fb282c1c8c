"""Quality of a class-conditional digits model, in numbers: does each sample look like the digit it was asked for?

The judge is an RBF SVC trained on real 8x8 scikit-learn digits (0..16 scale). Generated images are mapped back to that
space (area-downsampled to 8x8, [-1, 1] -> 0..16) and classified. Reported, as JSON:
  (a) class accuracy of the samples (and per class),
  (b) Fréchet distances between generated and real digits in two feature spaces: the SVC's 10 one-vs-rest decision
      values (a "FID" whose feature extractor knows digits) and raw 64 pixels; each with a real-vs-real reference
      (two disjoint halves of the real digits), the floor a perfect model would reach at that sample size,
  (c) sampling time.
"""

import time
from pathlib import Path

import numpy as np
import torch

from opendit.errors import OpenDiTError
from opendit.models.dit import DiT
from opendit.train.data import digits_to_unit, to_digits_scale, upsample

SHIPPED = Path(__file__).parent / "weights" / "digits.safetensors"
# C=5, gamma=0.001 (pixels 0..16): the best of a small grid; held-out accuracy 98.4-99.3 % over 25 % splits with
# random_state 0..2 (99.3 % on split 0, the one used here). The digits have a few genuinely ambiguous samples.
SVC_PARAMS = {"C": 5.0, "gamma": 0.001}
SPLIT_SEED, TEST_FRACTION = 0, 0.25


def fit_classifier() -> dict:
    """The judge: SVC fit on 75 % of the real digits. Returns the model, its held-out accuracy and the real data."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.data, digits.target, test_size=TEST_FRACTION, stratify=digits.target, random_state=SPLIT_SEED
    )
    svc = SVC(**SVC_PARAMS).fit(x_tr, y_tr)
    return {
        "svc": svc,
        "heldout_accuracy": float(svc.score(x_te, y_te)),
        "x_test": x_te,
        "y_test": y_te,
        "x_real": digits.data.astype(np.float64),  # (1797, 64) in 0..16
        "y_real": digits.target,
    }


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (rounding negatives clipped to 0)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) for Gaussians fitted to features a (N, D), b (M, D).

    Tr((S_a S_b)^1/2) = Tr((A S_b A)^1/2) with A = S_a^1/2, a symmetric PSD matrix: eigenvalues instead of a general
    sqrtm, so the always-zero border pixels of the digits (singular covariances) cost no accuracy and no warnings.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise OpenDiTError(f"Fréchet distance needs two (N>=2, D) feature sets of equal D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # (D, D) each
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a  # (D, D), symmetric PSD
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def _features(judge: dict, x: np.ndarray) -> dict[str, np.ndarray]:
    return {"svc": judge["svc"].decision_function(x), "pixels": x}  # (N, 10) and (N, 64)


def real_reference(judge: dict, seed: int = 0) -> dict[str, float]:
    """Fréchet distance between two random disjoint halves of the real digits: the sampling-noise floor."""
    perm = np.random.default_rng(seed).permutation(len(judge["x_real"]))
    half = len(perm) // 2
    first, second = judge["x_real"][perm[:half]], judge["x_real"][perm[half:]]
    fa, fb = _features(judge, first), _features(judge, second)
    return {name: frechet_distance(fa[name], fb[name]) for name in fa}


def roundtrip_accuracy(judge: dict, resolution: int) -> float:
    """The judge's accuracy on held-out real digits after upsample -> model resolution -> downsample: the pipeline's
    own loss, so a sample accuracy can be read against it."""
    unit = upsample(digits_to_unit(judge["x_test"]), resolution)  # (N, 1, r, r) in [0, 1]
    back = to_digits_scale(unit * 2 - 1)  # (N, 64) in 0..16
    return float(judge["svc"].score(back, judge["y_test"]))


def generate_digits(
    model: DiT,
    per_class: int,
    steps: int,
    cfg_scale: float,
    seed: int = 0,
    batch_size: int = 50,
    scheduler=None,
    hooks=(),
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """per_class samples of every class with the project sampler. Returns images (N, C, H, W), labels (N,), seconds.

    Sample i uses the sampler's per-image generator seed + i, so results do not depend on batch_size.
    """
    from opendit.diffusion.sampler import sample

    cfg = model.config
    if per_class < 1 or batch_size < 1:
        raise OpenDiTError(f"per_class and batch_size must be >= 1, got {per_class} and {batch_size}")
    if cfg.latent:
        raise OpenDiTError("evaluation judges pixel-space digits models; this model works in a VAE latent space")
    scheduler = scheduler or ("flow-euler" if cfg.prediction == "flow" else "ddim")
    labels = torch.arange(cfg.num_classes).repeat_interleave(per_class)  # (N,) 0,0,...,1,1,...
    device = next(model.parameters()).device
    chunks = []
    start = time.perf_counter()
    for first in range(0, len(labels), batch_size):
        batch = labels[first : first + batch_size]
        result = sample(
            model,
            batch,
            (cfg.in_channels, *cfg.input_size),
            num_classes=cfg.num_classes,
            scheduler_name=scheduler,
            prediction=cfg.prediction,
            learn_sigma=cfg.learn_sigma,
            steps=steps,
            cfg_scale=cfg_scale,
            seed=seed,
            first_index=first,
            device=device,
            hooks=hooks,
        )
        chunks.append(result.samples.cpu())  # (b, C, H, W)
    seconds = time.perf_counter() - start
    return torch.cat(chunks), labels, seconds


def score_samples(images: torch.Tensor, labels: torch.Tensor, judge: dict | None = None) -> dict:
    """Accuracy (overall, per class) and Fréchet distances of model-space samples (N, 1, H, W) in [-1, 1]."""
    judge = judge or fit_classifier()
    x = to_digits_scale(images)  # (N, 64) in 0..16
    y = labels.cpu().numpy()
    pred = judge["svc"].predict(x)
    per_class = [float((pred[y == c] == c).mean()) for c in np.unique(y)]
    gen, real = _features(judge, x), _features(judge, judge["x_real"])
    return {
        "accuracy": float((pred == y).mean()),
        "per_class_accuracy": per_class,
        "frechet": {name: frechet_distance(gen[name], real[name]) for name in gen},
    }


@torch.no_grad()
def evaluate(
    model: DiT,
    per_class: int = 100,
    steps: int = 30,
    cfg_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 50,
    scheduler: str | None = None,
) -> dict:
    """Generate per_class samples of each digit and judge them. Returns the JSON-ready report."""
    cfg = model.config
    if cfg.in_channels != 1 or cfg.num_classes != 10:
        raise OpenDiTError(
            f"evaluation needs a digits model (1 channel, 10 classes); this one has {cfg.in_channels} channels and "
            f"{cfg.num_classes} classes"
        )
    judge = fit_classifier()
    images, labels, seconds = generate_digits(model, per_class, steps, cfg_scale, seed, batch_size, scheduler)
    scores = score_samples(images, labels, judge)
    reference = real_reference(judge)
    n = len(labels)
    return {
        "accuracy": scores["accuracy"],
        "per_class_accuracy": scores["per_class_accuracy"],
        "frechet": {
            "svc_features": scores["frechet"]["svc"],
            "pixels": scores["frechet"]["pixels"],
            "real_vs_real_svc_features": reference["svc"],
            "real_vs_real_pixels": reference["pixels"],
        },
        "timing": {
            "sampling_s": seconds,
            "samples_per_s": n / seconds,
            "ms_per_sample_step": 1000 * seconds / (n * steps),
            "threads": torch.get_num_threads(),
            "device": str(next(model.parameters()).device),
        },
        "samples": {"per_class": per_class, "total": n, "steps": steps, "cfg_scale": cfg_scale, "seed": seed},
        "classifier": {
            "kind": f"sklearn SVC(rbf, C={SVC_PARAMS['C']}, gamma={SVC_PARAMS['gamma']}) on 8x8 pixels 0..16",
            "heldout_accuracy": judge["heldout_accuracy"],
            "heldout_size": len(judge["y_test"]),
            "roundtrip_accuracy": roundtrip_accuracy(judge, cfg.input_size[0]),
        },
        "model": {"config": cfg.to_dict(), "params": sum(p.numel() for p in model.parameters())},
    }


def load_for_eval(ckpt: str | Path | None = None, use: str = "ema") -> tuple[DiT, dict]:
    """A model from our .safetensors (+ .json), a training checkpoint .pt or its run directory (`use`: "ema" or
    "model" weights), or the shipped digits model when ckpt is None. The source is checked before anything is
    computed (one message per cause, checkpoint.py). Returns (model in eval mode, metadata with "path")."""
    from opendit.checkpoint import inspect_checkpoint, load_model

    if ckpt is None and not SHIPPED.is_file():
        raise OpenDiTError(f"the shipped model {SHIPPED} does not exist; train and export one (opendit train --export)")
    info = inspect_checkpoint(ckpt if ckpt is not None else SHIPPED, use=use)
    if info.config is None:
        raise OpenDiTError(
            f"checkpoint {info.path} has no model config (no .json beside it, not a training checkpoint); eval needs "
            "an opendit train run directory, its checkpoints/*.pt, or an export (opendit train --export PATH)"
        )
    model = load_model(info.config, info.path, use=use)
    return model, {**info.meta, "path": str(info.path)}
