"""What a diffusers pipeline holds on each rank besides its transformer, for `--memory-gib` planning: the text
encoders (each on one rank by default, parallel/encoders.py; every rank with --encode-every-rank; 1/N of each on
every rank with --encoder-shard, parallel/lean_pipeline.py, plus one gathered part at a time), the VAE and the
other weights (whole on every rank), and the decode phase's largest activation (split over the ranks when the VAE
decode is split, parallel/vae.py).

The decode estimate: a VAE decoder's peak is at its last up block, at full output resolution with its narrowest
channel count C0 (block_out_channels[0]); about four such tensors are alive at once there (the block input, the
group-norm output, the activation, the convolution output), so 4 * C0 * H * W * bytes per decoded frame. Split over
N ranks, each holds a band of H / N rows (plus a few halo rows, not counted).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ALIVE_AT_PEAK = 4  # full-resolution tensors alive at once in the decoder's last up block (see the module docstring)


@dataclass(frozen=True)
class PipelineMemory:
    """Bytes per rank, on the rank that holds the most."""

    encoders: int  # text encoder weights
    others: int  # the VAE and every other component but the transformer(s): whole on every rank
    decode: int  # the decode phase's largest activation
    sharded: bool = False  # the encoders sharded over the ranks (--encoder-shard)

    @property
    def total(self) -> int:
        return self.encoders + self.others + self.decode

    def describe(self) -> str:
        gib = 2**30
        placed = " (sharded over the ranks)" if self.sharded else ""
        return (f"{self.encoders / gib:.3g} GiB of text encoders{placed}, {self.others / gib:.3g} GiB of VAE and other "
                f"weights, {self.decode / gib:.3g} GiB of VAE decode activations")  # fmt: skip


# --encoder-shard: besides its 1/N shards a rank holds the part being gathered (all-gather output and the parameters
# copied out of it, sharding.split_block_units); a part is at most ~1/3 of a block and an encoder has tens of blocks
# (T5-XXL 24, UMT5 24, CLIP-L 12): 1/16 of the largest encoder bounds it for those.
GATHERED_SHARE = 16


def encoder_bytes_per_rank(component_bytes: dict[str, int], world: int, every_rank: bool, sharded: bool = False) -> int:
    """The text encoder weights on the rank that holds the most: all of them with `every_rank`, 1/world of each
    plus the largest one's gathered part with `sharded` (--encoder-shard), else each encoder on rank i mod world
    (parallel/encoders.py's placement)."""
    from opendit.parallel.encoders import ENCODER_PREFIX, encoder_owners

    names = sorted((n for n in component_bytes if n.startswith(ENCODER_PREFIX)), key=lambda n: (len(n), n))
    if every_rank or world == 1:
        return sum(component_bytes[n] for n in names)
    if sharded:
        largest = max((component_bytes[n] for n in names), default=0)
        return -(-sum(component_bytes[n] for n in names) // world) + largest // GATHERED_SHARE
    owners = encoder_owners(names, world)
    return max(sum(component_bytes[n] for n in names if owners[n] == rank) for rank in range(world))


def decode_bytes(folder: str | Path, height: int, width: int, frames: int, dtype_bytes: int, ranks: int) -> int:
    """The decoder's peak activation for one output of height x width (x frames decoded at once), its rows split
    over `ranks` (1: decoded whole)."""
    config_file = Path(folder) / "vae" / "config.json"
    if not config_file.is_file():
        return 0
    channels = json.loads(config_file.read_text()).get("block_out_channels") or [128]
    rows = -(-height // ranks)  # ceil: the largest band
    return ALIVE_AT_PEAK * int(channels[0]) * rows * width * max(frames, 1) * dtype_bytes


def pipeline_memory(info: dict, world: int, every_rank_encodes: bool, vae_split: bool, height: int, width: int,
                    frames: int, dtype_bytes: int, encoder_shard: bool = False) -> PipelineMemory:  # fmt: skip
    """The per-rank bytes of everything but the transformer(s) (`info`: api/pipelines.py's inspect_pipeline)."""
    components = info["component_bytes"]
    encoders = encoder_bytes_per_rank(components, world, every_rank_encodes, encoder_shard)
    denoisers = components.get("transformer", 0)  # planned by the cost model (a second expert counts as other)
    all_encoders = encoder_bytes_per_rank(components, 1, True)
    others = info["weight_bytes"] - denoisers - all_encoders
    decode = decode_bytes(info["folder"], height, width, frames, dtype_bytes, world if vae_split else 1)
    return PipelineMemory(encoders, others, decode, sharded=encoder_shard and world > 1 and not every_rank_encodes)
