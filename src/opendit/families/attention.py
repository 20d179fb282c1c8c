"""Where a strategy's kernel meets a diffusers attention module: only the attention call itself is replaced.

The module's processor keeps doing what diffusers wrote — projections, q/k norms, RoPE, output projections — and its
one attention call runs on an `AttentionSite` instead of on one device:
- processors that call `dispatch_attention_fn(..., parallel_config=self._parallel_config)` (every class with a
  `_cp_plan`, and any processor written that way): the site is set as that processor instance's `_parallel_config`,
  exactly where diffusers' own `enable_parallelism` puts its config, so a processor that passes `None` for a call
  (cross-attention to text that is not split, as Wan's does) keeps running it locally. The name
  `dispatch_attention_fn` in the processor's module is wrapped once: a call whose `parallel_config` is a site goes
  to the site, every other call to diffusers' function unchanged (tests/test_families_routing.py pins the name);
- processors that call `F.scaled_dot_product_attention` themselves (AttnProcessor2_0 of DiT / PixArt,
  JointAttnProcessor2_0 of SD3): a subclass of the processor's own class whose `__call__` runs the inherited one
  under a TorchFunctionMode that sends that one torch function to the site (nothing is patched).

The site (layout (B, S, H, D), flash-attn naming) asks the sequence state how the call's streams lie over the ranks
(every rank's token counts and a fingerprint of q and k, exchanged once per site and set of lengths), then
- q and k split alike (self- and joint attention): the strategy's kernel for those sizes;
- keys split, queries split otherwise or whole (cross-attention to a split text): K, V (and a key mask) are
  all-gathered and the local queries attend to every key — exact, and cheap for text;
- a key padding mask (Z-Image's batch of samples of different lengths, a padded text) is written into K as one more
  channel (`with_key_bias`), so it is split, moved and gathered with K/V by whichever strategy runs, exactly;
- keys whole on every rank (a stream the plan does not split): local attention, exact;
- tokens not split at this point of the call (`SequenceState.active` false): one-device attention.
"""

from __future__ import annotations

import inspect
import math
import sys

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from opendit.errors import OpenDiTError
from opendit.models.attention import local_attention


class AttentionSite:
    """One attention module's call over the sequence group; `kernels(sizes)` gives the strategy's core."""

    def __init__(self, path: str, state, kernels, owner: str):
        self.path, self.state, self.kernels, self.owner = path, state, kernels, owner

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False, **_ignored) -> torch.Tensor:  # fmt: skip
        """(B, S_q,r, H, D), (B, S_k,r, H_k, D) x2 -> (B, S_q,r, H, D)."""
        if dropout_p or is_causal:
            raise OpenDiTError(
                f"{self.owner} {self.path}: attention with dropout or a causal mask is not split over ranks "
                "(inference runs without dropout; a causal mask needs its own ring schedule); call model.eval()"
            )
        if scale is not None and not math.isclose(scale, query.shape[-1] ** -0.5, rel_tol=1e-6):
            query = query * (scale * query.shape[-1] ** 0.5)  # the kernels scale by D^-1/2: fold the rest into q
        if key.shape[2] != query.shape[2]:  # grouped-query attention: repeat K/V heads (exact)
            repeat = query.shape[2] // key.shape[2]
            key, value = key.repeat_interleave(repeat, dim=2), value.repeat_interleave(repeat, dim=2)
        if not self.state.active:
            return _local(query, key, value, attn_mask)
        mode, q_sizes, k_sizes = self.state.attention_layout(self.path, query, key)
        mask = _key_mask(attn_mask, query, key, self)
        if mode == "local":  # every key on every rank already
            return _local(query, key, value, mask)
        head_dim = query.shape[-1]
        if mask is not None:  # the key mask becomes a channel of K, so it moves wherever K moves (see KEY_BIAS)
            query, key, value = with_key_bias(query, key, value, mask)
        if mode == "split":
            out = self.kernels(q_sizes)(query, key, value)
        else:  # keys split, queries not alike: gather K, V (and so the key mask) over the group
            comm = self.state.comm
            key = comm.all_gather(key.contiguous(), 1, k_sizes)  # (B, S_k, H, D')
            value = comm.all_gather(value.contiguous(), 1, k_sizes)
            out = local_attention(query, key, value)
        return out[..., :head_dim] if mask is not None else out


# A key padding mask under split tokens: every strategy moves K (Ulysses' all-to-all, ring's P2P blocks, USP's both,
# FastSeq's all-gather, a gather of keys), so the mask is written into K as one more channel and travels with it,
# exactly, through any strategy, with no change to their kernels:
#   q' = [q * sqrt(D'/D), sqrt(D'), 0...],  k' = [k, b, 0...],  v' = [v, 0...]   (D' = D + KEY_BIAS channels)
# with b = 0 for a kept key and -KEY_MASKED for a masked one, so that q'.k' / sqrt(D') = q.k / sqrt(D) + b: kept keys
# score as before, masked keys' weights underflow to exactly 0 (exp(-1e4) is 0 in every float dtype), also in a ring
# block where every key of a row is masked (its log-sum-exp weight is exp(-1e4 + ...) = 0; no -inf, so no NaN).
# 8 channels keep D' a multiple of 8 for the fused kernels. Present on every rank or on none: whether a call has a
# mask is decided by the model's code path, which is the same on every rank, so the collectives match.
KEY_BIAS = 8
KEY_MASKED = 1e4


def with_key_bias(query, key, value, mask):
    """(B, S_q, H, D), (B, S_k, H, D) x2 and a bool key mask (B|1, H|1, 1, S_k) (True: attend) -> the same with
    D' = D + KEY_BIAS channels (see above); attention on them, cut to the first D channels, is the masked one."""
    b, s_k, h, d = key.shape
    wide = d + KEY_BIAS
    keep = mask[:, :, 0, :].transpose(1, 2).expand(b, s_k, h)  # (B, S_k, H)
    bias = torch.zeros((b, s_k, h, KEY_BIAS), dtype=key.dtype, device=key.device)
    bias[..., 0] = (~keep).to(key.dtype) * -KEY_MASKED  # |b| fits fp16; the sqrt(D') is on the query side
    lift = torch.zeros((*query.shape[:3], KEY_BIAS), dtype=query.dtype, device=query.device)
    lift[..., 0] = wide**0.5
    query = torch.cat([query * (wide / d) ** 0.5, lift], dim=-1)  # (B, S_q, H, D')
    key = torch.cat([key, bias], dim=-1)  # (B, S_k, H, D')
    value = torch.cat([value, value.new_zeros((*value.shape[:3], KEY_BIAS))], dim=-1)  # (B, S_k, H, D')
    return query, key, value


def _key_mask(attn_mask, query, key, site):
    """A mask over keys only, as a bool (B|1, H|1, 1, S_k,r) tensor (True: attend), or None without one; refuses
    masks that depend on the query. Whether there is a mask is the same on every rank (the same code path), so the
    collectives that follow match."""
    if attn_mask is None:
        return None
    mask = attn_mask
    if mask.is_floating_point():  # additive: 0 keeps; -inf, or a bias whose exp is 0 (LTX's -10000), masks
        if not bool(((mask == 0) | (mask <= -1e4)).all()):
            raise OpenDiTError(
                f"{site.owner} {site.path}: an additive attention mask with values other than 0 and <= -1e4 is a "
                "bias over the scores, not a key padding mask; only those are split over ranks"
            )
        mask = mask == 0
    elif mask.dtype != torch.bool:
        mask = mask.bool()
    if mask.dim() == 2:  # (B, S_k)
        mask = mask[:, None, None, :]
    elif mask.dim() == 3:  # (B, 1, S_k)
        mask = mask[:, None, :, :]
    elif mask.dim() == 4 and mask.dtype == torch.bool and mask.shape[-2] == query.shape[1] > 1:
        mask = _padding_square(mask)
    if mask.dim() != 4 or mask.shape[-2] != 1 or mask.shape[-1] != key.shape[1]:
        raise OpenDiTError(
            f"{site.owner} {site.path}: an attention mask of shape {tuple(attn_mask.shape)} is not a key padding "
            "mask (one row over the keys); only those are split over ranks"
        )
    return mask


def _padding_square(mask: torch.Tensor) -> torch.Tensor:
    """A (B, H|1, S, S) bool mask that is a key padding mask times itself over the queries (HunyuanVideo-1.5's
    `m_q & m_k`) -> the key mask (B, H|1, 1, S); any other square mask is returned as is (and refused). A padded query
    then attends to the kept keys instead of to none: its output changes, but a padded token is masked as a key
    wherever it would be read, so no kept token's output does."""
    keys = mask.any(dim=-2, keepdim=True)  # (B, H|1, 1, S)
    queries = mask.any(dim=-1, keepdim=True)  # (B, H|1, S, 1)
    return keys if torch.equal(mask, keys & queries) else mask


def _local(query, key, value, attn_mask):
    if attn_mask is None:
        return local_attention(query, key, value)
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         attn_mask=attn_mask)  # fmt: skip
    return out.transpose(1, 2)


# ------------------------------------------------------------------------------------------- dispatch route
_ROUTED = "_opendit_routed"


def routes_dispatch(processor) -> bool:
    """Whether this processor hands its attention to diffusers' dispatch_attention_fn with a parallel config."""
    module = sys.modules.get(type(processor).__module__)
    return hasattr(processor, "_parallel_config") and callable(getattr(module, "dispatch_attention_fn", None))


def route_dispatch(processor, site: AttentionSite) -> None:
    """Give this processor instance the site as its parallel config (see the module docstring)."""
    module = sys.modules[type(processor).__module__]
    original = module.dispatch_attention_fn
    if not getattr(original, _ROUTED, False):

        def dispatch_attention_fn(*args, parallel_config=None, **kwargs):
            if isinstance(parallel_config, AttentionSite):
                return parallel_config(*args, **kwargs)
            return original(*args, parallel_config=parallel_config, **kwargs)

        setattr(dispatch_attention_fn, _ROUTED, True)
        dispatch_attention_fn.__wrapped__ = original
        module.dispatch_attention_fn = dispatch_attention_fn
    processor._parallel_config = site


# ------------------------------------------------------------------------------------------- SDPA route
class _SdpaToSite(TorchFunctionMode):
    """Sends F.scaled_dot_product_attention ((B, H, S, D) layout) to the site; every other torch call runs as is."""

    def __init__(self, site: AttentionSite):
        super().__init__()
        self.site = site

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        call = {**dict(zip(names, args)), **kwargs}
        q, k, v = (call.pop(n).transpose(1, 2) for n in ("query", "key", "value"))  # (B, S, H, D)
        return self.site(q, k, v, **call).transpose(1, 2)  # (B, H, S_q, D)


def route_sdpa(attention_module, site: AttentionSite) -> None:
    """Replace the module's processor with a subclass of its class that runs under the site's SDPA route."""
    processor = attention_module.processor
    base = type(processor)
    inherited = base.__call__

    def __call__(self, *args, **kwargs):
        with _SdpaToSite(self._opendit_site):
            return inherited(self, *args, **kwargs)

    __call__.__signature__ = inspect.signature(inherited)  # diffusers filters call kwargs by this signature
    routed = type(f"SequenceParallel{base.__name__}", (base,), {"__call__": __call__})
    clone = routed.__new__(routed)
    clone.__dict__.update(processor.__dict__)
    clone._opendit_site = site
    attention_module.set_processor(clone)
