"""Quality of a class-conditional digits model, in numbers: does each sample look like the digit it was asked for?

The judge is an RBF SVC trained on real 8x8 scikit-learn digits (0..16 scale). Generated images are mapped back to that
space (area-downsampled to 8x8, [-1, 1] -> 0..16) and classified. Reported, as JSON:
  (a) class accuracy of the samples (and per class),
  (b) Fréchet distances between generated and real digits in two feature spaces: the SVC's 10 one-vs-rest decision
      values (a "FID" whose feature extractor knows digits) and raw 64 pixels; each with a real-vs-real reference
      (two disjoint halves of the real digits), the floor a perfect model would reach at that sample size,
  (c) sampling time.
"""

import functools
import time
from pathlib import Path

import numpy as np
import torch

from opendit.digits import WEIGHTS_DIR
from opendit.digits.data import DIGITS_MAX, digits_to_unit, to_digits_scale, upsample
from opendit.digits.video_data import CANVAS, DIRECTIONS, FRAMES, NUM_DIGITS, compose, start_counts
from opendit.errors import OpenDiTError
from opendit.models.dit import DiT

SHIPPED = WEIGHTS_DIR / "digits.safetensors"
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
    from opendit.io.checkpoint import inspect_checkpoint, load_model

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


# The judge of moving-digits videos: is every frame the digit asked for, and does it move the way it was asked to?
#
# Digit: the digit is located in each frame by the centre of mass of its bright pixels (intensity above FLOOR), a
# WINDOW x WINDOW crop is cut around the rounded centre (the frame padded with background, so nothing is clamped) and
# classified by an RBF SVC (evaluate.SVC_PARAMS) fit on the same crops of the SVC judge's training split. The crop is
# translation-equivariant: an integer shift of the digit moves the centre by the same shift, so a real digit gives the
# identical crop wherever it sits on the canvas, and the per-frame accuracy on real videos is the crop SVC's held-out
# accuracy. (The plain 8x8 SVC on an 8x8 crop placed by the centre scores only 82 %: the digits are not centred in their
# 8x8 box, their centre of mass varies by +-1.2 px, so crops from the real data disagree with the SVC's 8x8 frame.)
#
# Direction: least-squares slope (px / frame) of the centre of mass over the frames on each axis; the larger one in
# absolute value is the motion axis and its sign the direction (DIRECTIONS order: +x right, -x left, +y down, -y up).
# A video moving slower than MIN_SPEED, or with an empty frame, has no direction (-1, always wrong).
#
# Self-check, `judge_on_real()` (10 held-out digits per condition, 400 videos, 3,200 frames, seed 0): per-frame digit
# accuracy 0.9925, direction accuracy 1.0, both right 0.9925, speed 1.0 px / frame; with 45 per condition (seed 1,
# 1,800 videos) 0.985 / 1.0 / 0.985. The crop SVC's held-out accuracy is 0.987 (444 of 450; the 8x8 SVC's, on
# unshifted digits: 0.993).
FLOOR = 0.25  # unit intensity (4 of 16) below which a pixel does not count when locating the digit: faint noise of
# generated frames would otherwise pull the centre towards the middle of the canvas
WINDOW = 12  # crop side: the digits' centre of mass lies 2.3..4.7 px into their 8x8 box, so 12 px around it always
# holds the whole digit
MIN_SPEED = 0.25  # px / frame; real videos move exactly 1
NUM_CLASSES = NUM_DIGITS * len(DIRECTIONS)


def _unit(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """Frames (M, H, W) in [-1, 1] -> float64 numpy in [0, 1]."""
    x = torch.as_tensor(frames).detach().cpu().double().clamp(-1, 1)
    return ((x + 1) / 2).numpy()


def centres(unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frames (M, H, W) in [0, 1] -> centre of mass (M, 2) as (y, x) of the pixels above FLOOR (NaN if none), and
    their mass (M,)."""
    weight = np.clip(unit - FLOOR, 0, None)  # (M, H, W)
    mass = weight.sum((1, 2))  # (M,)
    ys, xs = np.arange(unit.shape[1]), np.arange(unit.shape[2])
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = (weight.sum(2) * ys).sum(1) / mass  # (M,)
        cx = (weight.sum(1) * xs).sum(1) / mass
    return np.stack([cy, cx], axis=1), mass


def crops(unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frames (M, H, W) in [0, 1] -> WINDOW x WINDOW crops around each centre, (M, WINDOW**2) in the 0..16 scale of
    load_digits, and a (M,) mask of frames with a digit to locate (an empty frame gets a zero crop)."""
    m, h, w = unit.shape
    centre, mass = centres(unit)
    found = mass > 0
    centre = np.where(found[:, None], centre, [[(h - 1) / 2, (w - 1) / 2]])  # (M, 2)
    # floor(c + 0.5), not np.round: round-half-even would break the shift equivariance at exact halves
    top_left = np.floor(centre + 0.5).astype(np.int64) - WINDOW // 2 + WINDOW  # (M, 2) in the padded frame
    padded = np.pad(unit, ((0, 0), (WINDOW, WINDOW), (WINDOW, WINDOW)))  # (M, H + 2W, W + 2W), background 0
    offset = np.arange(WINDOW)
    rows = top_left[:, 0, None, None] + offset[None, :, None]  # (M, WINDOW, 1)
    cols = top_left[:, 1, None, None] + offset[None, None, :]  # (M, 1, WINDOW)
    cut = padded[np.arange(m)[:, None, None], rows, cols]  # (M, WINDOW, WINDOW)
    cut = cut * found[:, None, None]
    return cut.reshape(m, -1) * DIGITS_MAX, found  # (M, WINDOW**2)


def _digit_crops(pixels: np.ndarray) -> np.ndarray:
    """load_digits pixels (N, 64) in 0..16 -> their crops (N, WINDOW**2), as the judge sees them in any frame."""
    return crops(digits_to_unit(pixels)[:, 0].double().numpy())[0]


@functools.lru_cache(maxsize=1)
def load_video_judge() -> dict:
    """The crop SVC, fit once per process on the SVC judge's training split (same split as evaluate.fit_classifier).

    Returns {"svc", "heldout_accuracy" (crop SVC on the held-out digits), "x_test", "y_test" (held-out digits (N, 64)
    in 0..16 and their labels), "base_heldout_accuracy" (the 8x8 SVC's)}. Treat it as read-only: it is shared.
    """
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    base = fit_classifier()
    target = base["y_real"]
    train, test = train_test_split(
        np.arange(len(target)), test_size=TEST_FRACTION, stratify=target, random_state=SPLIT_SEED
    )
    x = base["x_real"]  # (1797, 64) in 0..16
    if not np.array_equal(x[test], base["x_test"]):  # the held-out digits must stay unseen by both judges
        raise OpenDiTError("the video judge's split differs from evaluate.fit_classifier's; keep both on one split")
    svc = SVC(**SVC_PARAMS).fit(_digit_crops(x[train]), target[train])
    return {
        "svc": svc,
        "heldout_accuracy": float(svc.score(_digit_crops(x[test]), target[test])),
        "x_test": base["x_test"],
        "y_test": base["y_test"],
        "base_heldout_accuracy": base["heldout_accuracy"],
    }


def classify_frames(frames: torch.Tensor, judge: dict | None = None) -> np.ndarray:
    """Frames (M, H, W) in [-1, 1] -> predicted digit (M,) int64, -1 for a frame with nothing bright in it."""
    judge = judge or load_video_judge()
    x, found = crops(_unit(frames))
    pred = np.full(len(x), -1, dtype=np.int64)
    if found.any():
        pred[found] = judge["svc"].predict(x[found])
    return pred


def motion(videos: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Videos (N, F, 1, H, W) in [-1, 1] -> direction index (N,) (-1: none) and speed (N,) px / frame on its axis."""
    n, f = videos.shape[:2]
    centre, mass = centres(_unit(videos.reshape(n * f, *videos.shape[-2:])))
    centre = centre.reshape(n, f, 2)  # (N, F, (y, x))
    t = np.arange(f) - (f - 1) / 2  # (F,) centred frame times
    slope = np.einsum("nfa,f->na", np.nan_to_num(centre), t) / (t**2).sum()  # (N, 2) least squares, px / frame
    horizontal = np.abs(slope[:, 1]) >= np.abs(slope[:, 0])  # (N,)
    along = np.where(horizontal, slope[:, 1], slope[:, 0])  # (N,) signed speed on the motion axis
    # DIRECTIONS: 0 right (+x), 1 left (-x), 2 down (+y), 3 up (-y)
    direction = np.where(horizontal, 0, 2) + (along < 0)
    moving = (np.abs(along) >= MIN_SPEED) & (mass.reshape(n, f) > 0).all(1)
    return np.where(moving, direction, -1).astype(np.int64), np.abs(along)


def _per_condition(correct: np.ndarray, labels: np.ndarray) -> list[float | None]:
    """Mean of `correct` (N,) per label 0..39; None for a label without videos (JSON null)."""
    return [float(correct[labels == c].mean()) if (labels == c).any() else None for c in range(NUM_CLASSES)]


def score_videos(videos: torch.Tensor, labels: torch.Tensor, judge: dict | None = None) -> dict:
    """Judge videos (N, F, 1, H, W) in [-1, 1] against their labels (N,) in 0..39. JSON-ready:

    digit_accuracy: over all frames of all videos; video_digit_accuracy: the majority vote of a video's frames;
    direction_accuracy: per video; both_accuracy: majority digit and direction both right; mean_speed: px / frame
    on the motion axis (1.0 for real videos); per_condition: the same for each of the 40 labels (None if absent).
    """
    videos = torch.as_tensor(videos)
    if videos.ndim != 5 or videos.shape[2] != 1:
        raise OpenDiTError(
            f"expected grey videos (N, F, 1, H, W), got shape {tuple(videos.shape)}; digits are 1-channel"
        )
    n, f, _, h, w = videos.shape
    if n == 0:
        raise OpenDiTError("no videos to judge; pass at least one (N >= 1)")
    if f < 2 or min(h, w) < 8:
        raise OpenDiTError(f"videos need >= 2 frames of at least 8x8 to judge motion and digits, got {f} of {h}x{w}")
    y = torch.as_tensor(labels).detach().cpu().numpy().astype(np.int64).reshape(-1)
    if len(y) != n or y.min() < 0 or y.max() >= NUM_CLASSES:
        raise OpenDiTError(f"need one label in 0..{NUM_CLASSES - 1} per video: {n} videos, labels {y.tolist()[:8]}...")
    digit, direction = y % NUM_DIGITS, y // NUM_DIGITS  # (N,) each
    pred = classify_frames(videos.reshape(n * f, h, w), judge).reshape(n, f)  # (N, F)
    frame_right = pred == digit[:, None]  # (N, F)
    # majority vote per video; bincount over digits 0..9 (+1 shifts the "nothing found" -1 into slot 0)
    votes = np.stack([np.bincount(p + 1, minlength=NUM_DIGITS + 1)[1:] for p in pred])  # (N, 10)
    video_right = (votes.argmax(1) == digit) & (votes.max(1) > 0)
    moved, speed = motion(videos)
    direction_right = moved == direction
    both = video_right & direction_right
    return {
        "digit_accuracy": float(frame_right.mean()),
        "video_digit_accuracy": float(video_right.mean()),
        "direction_accuracy": float(direction_right.mean()),
        "both_accuracy": float(both.mean()),
        "mean_speed": float(speed.mean()),
        "per_condition": {
            "digit_accuracy": _per_condition(frame_right.mean(1), y),
            "direction_accuracy": _per_condition(direction_right, y),
            "both_accuracy": _per_condition(both, y),
        },
        "videos": n,
        "frames": f,
    }


def real_videos(
    n_per_condition: int = 10, seed: int = 0, frames: int = FRAMES, canvas: int = CANVAS, judge: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """n_per_condition held-out real digits per label composed into moving videos at random starts.

    Returns videos (40 * n, F, 1, canvas, canvas) in [-1, 1] and labels (40 * n,) ordered 0,0,...,1,1,...
    """
    if n_per_condition < 1:
        raise OpenDiTError(f"n_per_condition must be >= 1, got {n_per_condition}")
    judge = judge or load_video_judge()
    n_along, n_across = start_counts(frames, canvas)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(NUM_CLASSES), n_per_condition)  # (N,)
    picks = np.empty(len(labels), dtype=np.int64)
    for c in range(NUM_CLASSES):
        pool = np.flatnonzero(judge["y_test"] == c % NUM_DIGITS)  # about 45 held-out samples per digit
        picks[labels == c] = rng.choice(pool, n_per_condition, replace=n_per_condition > len(pool))
    digits = digits_to_unit(judge["x_test"][picks])[:, 0] * 2 - 1  # (N, 8, 8) in [-1, 1]
    along = rng.integers(0, n_along, len(labels))
    across = rng.integers(0, n_across, len(labels))
    videos = compose(digits, labels // NUM_DIGITS, along, across, frames, canvas)
    return videos, torch.as_tensor(labels)


def judge_on_real(n_per_condition: int = 10, seed: int = 0) -> dict:
    """The judge's self-check: score_videos on real held-out digits moving as the dataset moves them (see module)."""
    judge = load_video_judge()
    videos, labels = real_videos(n_per_condition, seed, judge=judge)
    return {
        **score_videos(videos, labels, judge),
        "n_per_condition": n_per_condition,
        "seed": seed,
        "crop_svc_heldout_accuracy": judge["heldout_accuracy"],
    }


# ------------------------------------------------------------------------------------------------ a model's videos
def generate_videos(
    model, per_condition: int, steps: int, cfg_scale: float, seed: int = 0, batch_size: int = 40, hooks=()
):
    """per_condition videos of every label with the project sampler: (videos (N, F, 1, H, W) in [-1, 1], labels (N,),
    seconds). Video i draws its noise from seed + i, so results do not depend on batch_size."""
    import time

    from opendit.diffusion.sampler import sample

    cfg = model.config
    if per_condition < 1 or batch_size < 1:
        raise OpenDiTError(f"per_condition and batch_size must be >= 1, got {per_condition} and {batch_size}")
    if not getattr(cfg, "motion", False) or cfg.num_classes != NUM_CLASSES or cfg.latent:
        raise OpenDiTError(
            "opendit eval --video judges a moving-digits video model (pixel space, 40 digit x direction labels, "
            "trained with opendit train --video); this model is not one"
        )
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_condition)  # (N,)
    device = next(model.parameters()).device
    chunks, start = [], time.perf_counter()
    for first in range(0, len(labels), batch_size):
        batch = labels[first : first + batch_size]
        result = sample(
            model, batch, cfg.sample_shape, num_classes=cfg.num_classes, scheduler_name="flow-euler",
            prediction=cfg.prediction, learn_sigma=False, steps=steps, cfg_scale=cfg_scale, seed=seed,
            first_index=first, device=device, hooks=hooks,
        )  # fmt: skip
        chunks.append(result.samples.cpu().transpose(1, 2))  # (b, C, F, H, W) -> (b, F, C, H, W)
    return torch.cat(chunks), labels, time.perf_counter() - start


def evaluate_video_model(
    model, per_condition: int = 10, steps: int = 30, cfg_scale: float = 3.0, seed: int = 0, batch_size: int = 40
) -> dict:
    """Sample per_condition videos of each of the 40 conditions and judge them (score_videos), with the judge's own
    score on real moving digits beside it (if it fails on real data, the judge is the problem) and timing."""
    videos, labels, seconds = generate_videos(model, per_condition, steps, cfg_scale, seed, batch_size)
    scores = score_videos(videos.clamp(-1, 1), labels)
    n = len(labels)
    return {
        **scores,
        "judge_on_real": judge_on_real(),
        "timing": {
            "sampling_s": seconds,
            "videos_per_s": n / seconds,
            "ms_per_video_step": 1000 * seconds / (n * steps),
            "threads": torch.get_num_threads(),
        },
        "samples": {"per_condition": per_condition, "total": n, "steps": steps, "cfg_scale": cfg_scale, "seed": seed},
        "model_config": {**model.config.to_dict(), "params": sum(p.numel() for p in model.parameters())},
    }
