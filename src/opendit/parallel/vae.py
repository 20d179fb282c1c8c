"""The VAE decode split over ranks (`--vae-parallel`): each rank decodes one band of latent rows, exactly.

Every rank holds the whole latent (a pipeline's loop, or OpenDiT's sampler, leaves it on every rank). The latent's
rows are split into contiguous bands (`split_sizes`: uneven allowed, every rank >= 1 row); each rank runs the VAE's
own decoder on its band, with the decoder's layers made band-aware in place (their `forward`s patched on the
instance, so the weights, the state dict and the module tree stay the VAE's own):

- every convolution with row padding p (3x3: p = 1) first runs on the band as if it were the whole image (zero rows
  at its edges), while its neighbours exchange their p edge rows (one batched send/recv per conv, overlapped with
  that main conv); then the band's first and last p output rows are recomputed from [neighbour's p rows; own 2p rows]
  (a "valid" conv in rows). A conv over a band of fewer than 2p rows runs once on [top halo; band; bottom halo].
  Per-layer halos are exact for any depth and any number of upsamplings (the halo never grows);
- nearest-neighbour upsampling and 1x1 convs are row-local: nothing to do;
- GroupNorm statistics are over the whole image: each rank's (count, mean, M2) per (image, group) (from torch's own
  group-norm kernel in fp32) are all-gathered and combined (Chan's parallel formula, fp64), then the band is
  normalised with them;
- the spatial self-attention (AutoencoderKL's mid-block, AutoencoderKLWan's per-frame block) runs its queries on
  the band against keys and values all-gathered over the ranks (row-major tokens: bands concatenate in order);
- Wan's causal time cache stays whole in time and banded in rows (each rank caches its own rows); its RMS norm
  normalises over channels per position, so it is row-local and needs no reduction.

The decoded bands are all-gathered (uneven sizes) so the caller on every rank gets the whole image. The result is the
one-process decode up to float rounding (fp32: ~1e-6, measured in tests/test_vae_split.py).

Supported: diffusers AutoencoderKL (group-norm decoder: DiT, PixArt, SD3, Flux and OpenDiT's latent models) and
AutoencoderKLWan (spatial split only). Any other VAE is refused before start (`check_vae_parallel`).

    split = install_vae_split(pipe.vae, comm, mode=None)   # wraps pipe.vae.decode; mode None = auto
    pipe(...)                                              # the pipeline's own vae.decode call runs split
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from opendit.distributed.comm import Comm
from opendit.distributed.env import inject_phase_fault
from opendit.errors import OpenDiTError
from opendit.parallel.sequence import offsets, split_sizes

SUPPORTED = ("AutoencoderKL", "AutoencoderKLWan")
# auto (--vae-parallel not given): split when every rank gets at least this many latent rows (8 px a row: 128 pixel
# rows); below it a band's halo and collectives cost more than its share of the convs saves (tiny images)
AUTO_MIN_ROWS = 16


# ------------------------------------------------------------------------------------------------ before start
def vae_refusal(class_name: str | None, config: dict | None = None) -> str | None:
    """Why a VAE class (and config) cannot be split exactly, or None when it can."""
    if class_name not in SUPPORTED:
        return (
            f"{class_name or 'this pipeline'} has no exact row-split plan (supported: {', '.join(SUPPORTED)}): its "
            "layers are not known to be band-local"
        )
    if class_name == "AutoencoderKL" and config is not None and config.get("norm_type", "group") != "group":
        return f"AutoencoderKL with norm_type={config.get('norm_type')!r} (spatial norm) has no row-split plan"
    return None


def check_vae_parallel(mode: bool | None, folder: str | Path, world: int) -> list[str]:
    """Before any process starts: `--vae-parallel` (mode True) on a pipeline folder whose VAE cannot be split is one
    OpenDiTError; returns the notes (auto on an unsupported VAE decodes whole, one process splits nothing)."""
    if mode is False:
        return []
    entry = _read(Path(folder) / "model_index.json").get("vae")
    class_name = str(entry[1]) if isinstance(entry, list) and len(entry) == 2 else None
    why = vae_refusal(class_name, _read(Path(folder) / "vae" / "config.json"))
    if why is not None:
        if mode:
            raise OpenDiTError(f"--vae-parallel: {why}; drop --vae-parallel (every rank then decodes whole)")
        return [f"VAE decoded whole on every rank: {why}"] if world > 1 else []
    if mode and world == 1:
        return ["--vae-parallel with one process: the VAE decodes whole"]
    return []


def _read(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ------------------------------------------------------------------------------------------------ the band
@dataclass
class Band:
    """The split in progress: the comm over every rank, the latent rows of each rank, this rank's; inactive (None
    sizes) outside a split decode, when every patched layer runs as the VAE's own."""

    comm: Comm
    sizes: list[int] | None = None  # latent rows per rank (None: not decoding split)
    last: dict = field(default_factory=dict)  # the last decode's record (split or not, rows per rank, why)

    @property
    def active(self) -> bool:
        return self.sizes is not None

    @property
    def up(self) -> int | None:
        return self.comm.rank - 1 if self.comm.rank > 0 else None

    @property
    def down(self) -> int | None:
        return self.comm.rank + 1 if self.comm.rank < self.comm.size - 1 else None

    def level_sizes(self, rows: int) -> list[int]:
        """Rows of every rank's band at a level where this rank has `rows` (the same upsampling on every rank)."""
        mine = self.sizes[self.comm.rank]
        if rows % mine:
            raise OpenDiTError(f"VAE split: a band of {rows} rows is not a whole upsampling of {mine} latent rows")
        return [size * (rows // mine) for size in self.sizes]

    def halo(self, x: torch.Tensor, p: int):
        """Start the exchange of p edge rows (dim -2) with the neighbours: x (..., h, W) sends its first p rows up
        and its last p rows down; the handle's wait() gives {rank: (..., p, W)} from the neighbours it has."""
        shape = (*x.shape[:-2], p, x.shape[-1])
        sends, recvs = {}, {}
        for peer, rows in ((self.up, x[..., :p, :]), (self.down, x[..., -p:, :])):
            if peer is not None:
                sends[peer] = rows  # (..., p, W)
                recvs[peer] = (shape, x.dtype)
        return self.comm.exchange(sends, recvs, kind="vae_halo")


def auto_splits(latent_rows: int, world: int) -> bool:
    """auto (no --vae-parallel given): split when every rank gets at least AUTO_MIN_ROWS latent rows."""
    return world > 1 and latent_rows >= AUTO_MIN_ROWS * world


def split_planned(mode: bool | None, latent_rows: int, world: int) -> bool:
    """Whether a decode of `latent_rows` rows runs split under --vae-parallel `mode` (True, False, None = auto) on
    `world` ranks, for a VAE that has a split plan: what the loaders (the VAE on every rank) and the memory
    planner (a band per rank) decide from before the decode itself asks `VaeSplit.wanted`."""
    return world > 1 and mode is not False and (mode is True or auto_splits(latent_rows, world))


# ------------------------------------------------------------------------------------------------ layers
def _rows_padding(conv: nn.Module) -> int:
    """The row padding of a stride-1 'same' conv (0: row-local, e.g. 1x1); refuses what a halo cannot make exact."""
    if isinstance(conv, nn.Conv2d):
        pad, kernel, stride, dilation = conv.padding, conv.kernel_size[0], conv.stride[0], conv.dilation[0]
        if isinstance(pad, str):
            raise OpenDiTError(f"VAE split: {type(conv).__name__} with padding={pad!r} has no row-split plan")
        p = pad[0]
    else:  # WanCausalConv3d: its padding (w, w, h, h, 2t, 0) is applied by its own forward
        p, kernel, stride, dilation = conv._padding[2], conv.kernel_size[1], conv.stride[1], conv.dilation[1]
    if p == 0 and kernel == 1 and stride == 1:
        return 0
    if stride != 1 or 2 * p != dilation * (kernel - 1) or getattr(conv, "padding_mode", "zeros") != "zeros":
        raise OpenDiTError(
            f"VAE split: a conv with kernel {kernel}, stride {stride}, row padding {p} is not a 'same' zero-padded "
            "conv; this VAE has no row-split plan (drop --vae-parallel)"
        )
    return p


def _split_conv(conv: nn.Module, band: Band, p: int, main, valid, x: torch.Tensor) -> torch.Tensor:
    """A 'same' conv with row padding p on this rank's band x (..., h, W): main(x) as if the band were the image
    (zero rows at its edges), then the edge rows that need the neighbours' rows recomputed by valid(rows), a conv
    with no row padding ((..., h + 2p, W) -> (..., h, W'))."""
    handle = band.halo(x, p)
    h = x.shape[-2]
    if h < 2 * p:  # a thin band: one conv over [top halo; band; bottom halo], zeros where there is no neighbour
        halos = handle.wait()
        zeros = x.new_zeros(*x.shape[:-2], p, x.shape[-1])
        top, bottom = halos.get(band.up, zeros), halos.get(band.down, zeros)
        return valid(torch.cat([top, x, bottom], dim=-2))  # (..., h + 2p, W) -> (..., h, W')
    out = main(x)  # (..., h, W'): exact but for its first and last p rows (overlaps the exchange)
    halos = handle.wait()
    if band.up is not None:  # [p rows from above; own first 2p rows] -> the first p output rows
        out[..., :p, :] = valid(torch.cat([halos[band.up], x[..., : 2 * p, :]], dim=-2))
    if band.down is not None:  # [own last 2p rows; p rows from below] -> the last p output rows
        out[..., -p:, :] = valid(torch.cat([x[..., -2 * p :, :], halos[band.down]], dim=-2))
    return out


def _conv2d_forward(conv: nn.Conv2d, band: Band, x: torch.Tensor) -> torch.Tensor:
    p = _rows_padding(conv)
    if not band.active or p == 0:
        return nn.Conv2d.forward(conv, x)
    pad_w = conv.padding[1]

    def valid(rows: torch.Tensor) -> torch.Tensor:  # (B, C, h + 2p, W) -> (B, C', h, W)
        return F.conv2d(rows, conv.weight, conv.bias, conv.stride, (0, pad_w), conv.dilation, conv.groups)

    return _split_conv(conv, band, p, lambda t: nn.Conv2d.forward(conv, t), valid, x)


def _causal_conv3d_forward(conv: nn.Conv3d, band: Band, x: torch.Tensor, cache_x=None) -> torch.Tensor:
    """WanCausalConv3d.forward with its row padding from the neighbours: the time cache is joined first (as the VAE
    does), so the halo rows carry the cached frames too. x (B, C, T, h, W)."""
    p = _rows_padding(conv)
    if not band.active or p == 0:
        return type(conv).forward(conv, x, cache_x)
    padding = list(conv._padding)  # (w, w, h, h, 2t, 0) as F.pad takes it
    if cache_x is not None and padding[4] > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)  # (B, C, T_cache + T, h, W)
        padding[4] -= cache_x.shape[2]
    no_rows = [padding[0], padding[1], 0, 0, padding[4], padding[5]]

    def run(t: torch.Tensor, pads: list[int]) -> torch.Tensor:  # padded as asked, then the conv with no padding
        return nn.Conv3d.forward(conv, F.pad(t, pads))

    return _split_conv(conv, band, p, lambda t: run(t, padding), lambda t: run(t, no_rows), x)


STATS_CHUNKS = 8  # the band's (image, group) rows in this many pieces for the statistics (bounded temporaries)


def _band_statistics(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, variance) per (image, group) of the band x (B, C, *rest), fp64, and the count each is over.

    fp32: torch's own group-norm kernel on (image, group) rows, a few rows at a time (its normalised output is a
    temporary of 1/STATS_CHUNKS of the band, dropped): 0.15 s where torch.var_mean took 1.06 s on a (1, 32, 512, 1024)
    band, one CPU thread.
    Other dtypes: torch.var_mean in fp32."""
    batch = x.shape[0]
    rows = x.reshape(batch * groups, -1)  # (B*G, C/G * rest): a view of a contiguous band
    if x.dtype != torch.float32:
        var, mean = torch.var_mean(rows.float(), dim=-1, correction=0)  # (B*G,) each
        return mean.double().view(batch, groups), var.double().view(batch, groups), rows.shape[1]
    means, variances = [], []
    for part in rows.chunk(STATS_CHUNKS, dim=0):  # (n, C/G * rest), contiguous
        _out, mean, rstd = torch.native_group_norm(part, None, None, part.shape[0], 1, part.shape[1], 1, eps)
        means.append(mean.double().view(-1))  # (n,)
        variances.append(rstd.double().view(-1).pow(-2) - eps)  # the kernel's rstd = 1 / sqrt(var + eps)
    return torch.cat(means).view(batch, groups), torch.cat(variances).view(batch, groups), rows.shape[1]


def _group_norm_forward(norm: nn.GroupNorm, band: Band, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm of the whole image on this rank's band x (B, C, *rest): per (image, group) statistics of the band
    (`_band_statistics`), combined over the ranks, then x * scale + shift per (image, channel)."""
    if not band.active:
        return nn.GroupNorm.forward(norm, x)
    batch, channels, groups = x.shape[0], x.shape[1], norm.num_groups
    mean_l, var_l, count = _band_statistics(x.contiguous(), groups, norm.eps)  # (B, G), (B, G), int
    mine = torch.stack([torch.full_like(mean_l, count), mean_l, var_l * count])  # (3, B, G): n, mean, M2
    every = band.comm.all_gather(mine, 0, [3] * band.comm.size, kind="vae_norm")  # (3P, B, G)
    n, means, m2 = every.view(band.comm.size, 3, batch, groups).unbind(1)  # (P, B, G) each
    total = n.sum(0)  # (B, G)
    mean = (n * means).sum(0) / total
    var = (m2 + n * (means - mean) ** 2).sum(0) / total  # Chan et al.'s combination
    rstd = torch.rsqrt(var + norm.eps)  # (B, G)
    weight = norm.weight.double() if norm.weight is not None else torch.ones(channels, dtype=torch.float64)
    bias = norm.bias.double() if norm.bias is not None else torch.zeros(channels, dtype=torch.float64)
    scale = rstd.repeat_interleave(channels // groups, dim=1) * weight.to(rstd.device)  # (B, C)
    shift = bias.to(rstd.device) - mean.repeat_interleave(channels // groups, dim=1) * scale  # (B, C)
    shape = (batch, channels) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))  # (B, C, *rest)


class SplitAttnProcessor:
    """diffusers' AttnProcessor2_0 for a VAE's spatial self-attention on a band: the band's queries against the keys
    and values of every rank's band (all-gathered). Outside a split decode: the module's own processor."""

    def __init__(self, own, band: Band):
        self.own, self.band = own, band

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if not self.band.active:
            return self.own(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None:
            raise OpenDiTError("VAE split: a cross-attention, masked or spatial-norm VAE attention has no split plan")
        residual = hidden_states
        batch, channels, rows, width = hidden_states.shape
        tokens = hidden_states.view(batch, channels, rows * width).transpose(1, 2)  # (B, h*W, C)
        if attn.group_norm is not None:  # patched: statistics over every rank
            tokens = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(tokens)  # (B, h*W, inner)
        kv = torch.stack([attn.to_k(tokens), attn.to_v(tokens)])  # (2, B, h*W, inner)
        sizes = [r * width for r in self.band.level_sizes(rows)]
        kv = self.band.comm.all_gather(kv, 2, sizes, kind="vae_attention")  # (2, B, H*W, inner)
        heads, inner = attn.heads, query.shape[-1]
        query = query.view(batch, -1, heads, inner // heads).transpose(1, 2)  # (B, heads, h*W, d)
        key, value = (t.view(batch, -1, heads, inner // heads).transpose(1, 2) for t in kv)  # (B, heads, H*W, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)  # (B, heads, h*W, d)
        out = out.transpose(1, 2).reshape(batch, -1, inner).to(query.dtype)  # (B, h*W, inner)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(-1, -2).reshape(batch, channels, rows, width)  # (B, C, h, W)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _wan_attention_forward(block: nn.Module, band: Band, x: torch.Tensor) -> torch.Tensor:
    """WanAttentionBlock.forward (one head, per frame) with every rank's keys and values. x (B, C, T, h, W)."""
    if not band.active:
        return type(block).forward(block, x)
    identity = x
    batch, channels, time, rows, width = x.shape
    x = x.permute(0, 2, 1, 3, 4).reshape(batch * time, channels, rows, width)  # (B*T, C, h, W)
    x = block.norm(x)  # RMS over channels per position: row-local
    qkv = block.to_qkv(x).reshape(batch * time, 1, channels * 3, -1)  # (B*T, 1, 3C, h*W)
    q, k, v = qkv.permute(0, 1, 3, 2).contiguous().chunk(3, dim=-1)  # (B*T, 1, h*W, C) each
    sizes = [r * width for r in band.level_sizes(rows)]
    kv = band.comm.all_gather(torch.stack([k, v]), 3, sizes, kind="vae_attention")  # (2, B*T, 1, H*W, C)
    x = F.scaled_dot_product_attention(q, kv[0], kv[1])  # (B*T, 1, h*W, C)
    x = x.squeeze(1).permute(0, 2, 1).reshape(batch * time, channels, rows, width)  # (B*T, C, h, W)
    x = block.proj(x)
    x = x.view(batch, time, channels, rows, width).permute(0, 2, 1, 3, 4)  # (B, C, T, h, W)
    return x + identity


# ------------------------------------------------------------------------------------------------ install
class VaeSplit:
    """A VAE whose `decode` splits its rows over `comm`'s ranks (see the module docstring). mode: True = always
    (refused when the latent has fewer rows than ranks), None = auto (>= AUTO_MIN_ROWS latent rows per rank),
    False = never. `remove()` restores the VAE."""

    def __init__(self, vae: nn.Module, comm: Comm, mode: bool | None = None):
        why = vae_refusal(type(vae).__name__, dict(getattr(vae, "config", {}) or {}))
        if why is not None:
            raise OpenDiTError(f"--vae-parallel: {why}; drop --vae-parallel")
        self.vae, self.band, self.mode = vae, Band(comm), mode
        self._patched: list[tuple[object, str]] = []
        self._own_processors: list[tuple[nn.Module, object]] = []
        self._patch_decoder(vae.decoder)
        self._own_decode = vae.decode

        def decode(z, *args, **kwargs):  # the VAE's decode signature, split
            return self.decode(z, *args, **kwargs)

        self._set(vae, "decode", decode)

    def _set(self, owner, name: str, value) -> None:
        setattr(owner, name, value)  # an instance attribute: shadows the class's method until remove()
        self._patched.append((owner, name))

    def _patch_decoder(self, decoder: nn.Module) -> None:
        from diffusers.models.attention_processor import Attention
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanCausalConv3d

        band = self.band
        for module in decoder.modules():
            if isinstance(module, WanCausalConv3d):
                _rows_padding(module)  # refuses now what a halo cannot make exact
                self._set(module, "forward", functools.partial(_causal_conv3d_forward, module, band))
            elif isinstance(module, nn.Conv2d):
                _rows_padding(module)
                self._set(module, "forward", functools.partial(_conv2d_forward, module, band))
            elif isinstance(module, nn.GroupNorm):
                self._set(module, "forward", functools.partial(_group_norm_forward, module, band))
            elif isinstance(module, WanAttentionBlock):
                self._set(module, "forward", functools.partial(_wan_attention_forward, module, band))
            elif isinstance(module, Attention):
                self._own_processors.append((module, module.processor))
                module.processor = SplitAttnProcessor(module.processor, band)
            elif isinstance(module, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                raise OpenDiTError(f"VAE split: the decoder's {type(module).__name__} has no row-split plan")

    def remove(self) -> None:
        for owner, name in reversed(self._patched):
            delattr(owner, name)
        for module, processor in self._own_processors:
            module.processor = processor
        self._patched, self._own_processors = [], []

    def wanted(self, rows: int) -> tuple[bool, str]:
        """Whether a latent of `rows` rows is split, and why."""
        world = self.band.comm.size
        if self.mode is False or world == 1:
            return False, "off"
        if getattr(self.vae, "use_tiling", False):
            return False, "the VAE decodes in tiles (enable_tiling): its own split, kept"
        if rows < world:
            if self.mode:
                raise OpenDiTError(
                    f"--vae-parallel: the latent has {rows} rows, fewer than the {world} ranks (one row each at "
                    "least); drop --vae-parallel or make the image taller"
                )
            return False, f"auto: {rows} latent rows for {world} ranks"
        if self.mode is None and not auto_splits(rows, world):
            return False, f"auto: {rows} latent rows < {AUTO_MIN_ROWS} per rank x {world} ranks"
        return True, "--vae-parallel" if self.mode else f"auto: >= {AUTO_MIN_ROWS} latent rows per rank"

    def decode(self, z: torch.Tensor, *args, **kwargs):
        """The VAE's own decode of this rank's band of z (B, C, [T,] H, W), the bands all-gathered: the whole
        decode on every rank, in the VAE's own return type."""
        rows = z.shape[-2]
        split, why = self.wanted(rows)
        if not split:
            self.band.last = {"split": False, "why": why}
            return self._own_decode(z, *args, **kwargs)
        comm = self.band.comm
        sizes = split_sizes(rows, comm.size)
        start, mine = offsets(sizes)[comm.rank], sizes[comm.rank]
        with self._active(sizes):
            inject_phase_fault("decode")  # test hook: this rank fails while its peers wait in the halo exchange
            out = self._own_decode(z[..., start : start + mine, :].contiguous(), *args, **kwargs)
        sample = out[0] if isinstance(out, tuple) else out.sample  # (B, 3, [T,] h * f, W * f)
        factor = sample.shape[-2] // mine
        full = comm.all_gather(sample.contiguous(), -2, [s * factor for s in sizes], kind="vae_gather")
        self.band.last = {"split": True, "why": why, "latent_rows": sizes}
        if isinstance(out, tuple):
            return (full, *out[1:])
        out.sample = full  # (B, 3, [T,] H, W)
        return out

    @contextlib.contextmanager
    def _active(self, sizes: list[int]):
        self.band.sizes = sizes
        try:
            yield
        finally:
            self.band.sizes = None


def install_vae_split(vae: nn.Module, comm: Comm, mode: bool | None = None) -> VaeSplit:
    """Make `vae.decode` split over `comm`'s ranks (every rank must call decode together). Refuses a VAE that has
    no exact split plan with one OpenDiTError."""
    return VaeSplit(vae, comm, mode)
