"""Moving digits: the paths stay inside the canvas, move 1 px/frame the labelled way, and the video judge can tell."""

import json

import numpy as np
import pytest
import torch

from opendit.digits.data import BatchSampler
from opendit.digits.judges import judge_on_real, load_video_judge, motion, real_videos, score_videos
from opendit.digits.video_data import (
    DIRECTIONS,
    VELOCITY,
    MovingDigitsDataset,
    compose,
    describe,
    label_for,
    positions,
    start_counts,
)
from opendit.errors import OpenDiTError


@pytest.fixture(scope="module")
def data():
    return MovingDigitsDataset()


def _every_path(data):
    """One video per (direction, along, across) of sample 0: indices (4 * 2 * 9,)."""
    per_sample = len(DIRECTIONS) * data.n_along * data.n_across
    return torch.arange(per_sample)  # sample 0 is the slowest digit of the mixed radix


def test_shape_size_and_interface(data):
    assert len(data) == 1797 * 4 * 2 * 9
    assert (data.num_classes, data.channels, data.resolution, data.frames) == (40, 1, (16, 16), 8)
    assert data.class_names[3] == "3 right" and data.class_names[27] == "7 down" and len(data.class_names) == 40
    videos, labels = data.batch(torch.tensor([0, len(data) - 1]))
    assert videos.shape == (2, 8, 1, 16, 16) and videos.dtype == torch.float32 and labels.dtype == torch.int64
    assert videos.min() >= -1 and videos.max() <= 1
    assert (videos == -1).float().mean() > 0.7  # background -1 dominates: one 8x8 digit on 16x16


def test_paths_stay_inside_the_canvas(data):
    assert start_counts(8, 16) == (2, 9)
    for d in range(4):
        along, across = torch.meshgrid(torch.arange(2), torch.arange(9), indexing="ij")
        y0, x0 = positions(torch.full((18,), d), along.flatten(), across.flatten())  # (18, F)
        assert y0.min() >= 0 and x0.min() >= 0 and y0.max() + 8 <= 16 and x0.max() + 8 <= 16
    # no pixel is lost: every frame holds the digit's full mass (ink above the background)
    videos, _ = data.batch(_every_path(data))
    sample, *_ = data.decode(_every_path(data))
    ink = (data.digits[sample] + 1).sum((1, 2))  # (B,)
    np.testing.assert_allclose((videos + 1).sum((2, 3, 4)), ink[:, None].expand(-1, 8), rtol=1e-5)


def test_one_pixel_per_frame_in_the_labelled_direction(data):
    indices = torch.cat(
        [_every_path(data), torch.randint(0, len(data), (64,), generator=torch.Generator().manual_seed(0))]
    )
    videos, labels = data.batch(indices)
    for video, label in zip(videos[:, :, 0], labels):
        dy, dx = VELOCITY[int(label) // 10]
        for k in range(7):
            # frame k moved by (dy, dx) is frame k+1: the digit never reaches the border, so the roll wraps only
            # background onto background
            shifted = torch.roll(video[k], shifts=(dy, dx), dims=(0, 1))
            assert torch.equal(shifted, video[k + 1])
        assert not torch.equal(video[0], video[1])  # it does move


def test_labels_decode_back(data):
    indices = torch.randint(0, len(data), (200,), generator=torch.Generator().manual_seed(1))
    sample, direction, along, across = data.decode(indices)
    _, labels = data.batch(indices)
    for s, d, label in zip(sample, direction, labels):
        digit, name = describe(int(label))
        assert digit == int(data.digit_labels[s]) and name == DIRECTIONS[int(d)]
        assert label_for(digit, name) == label_for(digit, int(d)) == int(label)
    # the index decomposition is a bijection
    recomposed = ((sample * 4 + direction) * data.n_along + along) * data.n_across + across
    assert torch.equal(recomposed, indices)


def test_batches_are_deterministic(data):
    sampler = BatchSampler(len(data), 16, seed=3)
    a, la = data.batch(sampler.indices(5))
    b, lb = MovingDigitsDataset().batch(BatchSampler(len(data), 16, seed=3).indices(5))
    assert torch.equal(a, b) and torch.equal(la, lb)
    one, label = data[int(sampler.indices(5)[0])]
    assert torch.equal(one, a[0]) and label == int(la[0])


def test_bad_input_names_the_fix(data):
    with pytest.raises(OpenDiTError, match="right, left, down, up"):
        label_for(3, "sideways")
    with pytest.raises(OpenDiTError, match="right, left, down, up"):
        label_for(3, 4)
    with pytest.raises(OpenDiTError, match="0..9"):
        label_for(10, "up")
    with pytest.raises(OpenDiTError, match="canvas >= 15"):
        MovingDigitsDataset(frames=8, canvas=14)
    with pytest.raises(OpenDiTError, match="0..129383"):
        data.batch(torch.tensor([len(data)]))
    with pytest.raises(OpenDiTError, match="along 0..1"):
        compose(torch.zeros(1, 8, 8), torch.tensor([0]), torch.tensor([2]), torch.tensor([0]))
    small = MovingDigitsDataset(frames=4, canvas=11)  # generic: the smallest canvas for 4 frames
    assert small.batch(torch.arange(len(small))[-3:])[0].shape == (3, 4, 1, 11, 11)


@pytest.fixture(scope="module")
def real():
    return real_videos(10, seed=0)


def test_the_judge_knows_real_moving_digits(real):
    report = judge_on_real(10, seed=0)
    assert report["digit_accuracy"] >= 0.95  # 0.9925 (3,200 frames of held-out digits)
    assert report["direction_accuracy"] >= 0.99  # 1.0
    assert report["mean_speed"] == pytest.approx(1.0)
    assert len(report["per_condition"]["digit_accuracy"]) == 40
    json.dumps(report)  # JSON-ready
    # the crop is translation-equivariant: a real digit scores the same anywhere on the canvas
    assert report["digit_accuracy"] == pytest.approx(load_video_judge()["heldout_accuracy"], abs=0.02)
    # and the dataset's own videos (training digits) are judged the same way
    data_videos, data_labels = MovingDigitsDataset().batch(torch.arange(0, 129384, 997))
    assert score_videos(data_videos, data_labels)["direction_accuracy"] == 1.0


def test_the_judge_is_not_fooled(real):
    videos, labels = real
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(videos.shape, generator=gen) * 2 - 1
    bad = score_videos(noise, labels)
    assert bad["digit_accuracy"] < 0.3 and bad["direction_accuracy"] < 0.3 and bad["both_accuracy"] < 0.1
    # the right digit moving the wrong way: digit right, direction always wrong
    opposite = labels % 10 + 10 * ((labels // 10) ^ 1)  # right <-> left, down <-> up
    wrong_way = score_videos(videos, opposite)
    assert wrong_way["direction_accuracy"] == 0.0 and wrong_way["both_accuracy"] == 0.0
    assert wrong_way["digit_accuracy"] >= 0.95
    # a wrong digit moving the right way; a still digit (frame 0 repeated) has no direction at all
    wrong_digit = score_videos(videos, (labels % 10 + 1) % 10 + 10 * (labels // 10))
    assert wrong_digit["digit_accuracy"] < 0.1 and wrong_digit["direction_accuracy"] == 1.0
    still = videos[:, :1].expand_as(videos)
    assert (motion(still)[0] == -1).all() and score_videos(still, labels)["direction_accuracy"] == 0.0
    blank = score_videos(torch.full_like(videos, -1), labels)
    assert blank["digit_accuracy"] == 0.0 and blank["direction_accuracy"] == 0.0
    with pytest.raises(OpenDiTError, match="1-channel"):
        score_videos(videos[:, :, 0], labels)
    with pytest.raises(OpenDiTError, match="0..39"):
        score_videos(videos, labels + 40)
