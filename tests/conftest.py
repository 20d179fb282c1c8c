import os

# The CPU suite hides CUDA (its tolerances are CPU's, its process groups gloo): `make test` on a GPU machine stays the
# CPU suite. The GPU lane (tests/gpu, `make test-gpu`) sets OPENDIT_GPU=1. Set before torch initialises CUDA.
if os.environ.get("OPENDIT_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread per test process: the machine has 2 cores and multi-process tests spawn their own workers.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def tiny_config():
    """A DiT-T/2 pixel-space model: 16x16x1 images, 64 tokens, 10 classes."""
    from opendit.models.dit import pixel_config

    return pixel_config("DiT-T/2", 16)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A small 4-channel AutoencoderKL saved as a local folder (x8 down/up-sampling, as sd-vae-ft-*)."""
    from diffusers import AutoencoderKL

    path = tmp_path_factory.mktemp("vae") / "vae"
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1,
    ).save_pretrained(path)  # fmt: skip
    return path
