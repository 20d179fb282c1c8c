"""Where sharded weights split each parameter (parallel/sharding.py `_placement_for`); no processes needed."""

import torch
from torch import nn
from torch.distributed.tensor import Shard

from opendit.parallel.sharding import _placement_for


def placement(shape, world):
    return _placement_for(world)(nn.Parameter(torch.zeros(shape), requires_grad=False))


def test_parameters_with_enough_rows_keep_fsdp2s_dim_0():
    assert placement((1152, 1152), 4) is None
    assert placement((4, 1152), 4) is None  # exactly P rows
    assert placement((7,), 8) is None  # 1-D: dim 0 is the only dim (padded, small)


def test_few_rows_shard_the_largest_evenly_divisible_dim():
    assert placement((1, 16384, 1152), 4) == Shard(1)  # pos_embed: tokens are the largest dim P divides
    assert placement((1, 64, 128), 4) == Shard(2)
    assert placement((1, 256, 1152), 3) == Shard(2)  # 3 does not divide 256 tokens; it divides 1152
    assert placement((2, 7, 1152), 8) == Shard(2)


def test_no_evenly_divisible_dim_falls_back_to_dim_0():
    assert placement((1, 7, 11), 3) is None  # FSDP2 needs even shards off dim 0; padded dim 0 still works
