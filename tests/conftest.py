import os

import pytest
import torch

# One thread per test process: the machine has 2 cores and multi-process tests spawn their own workers.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def tiny_config():
    """A DiT-T/2 pixel-space model: 16x16x1 images, 64 tokens, 10 classes."""
    from opendit.models.dit import pixel_config

    return pixel_config("DiT-T/2", 16)
