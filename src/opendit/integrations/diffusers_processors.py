"""Attention processors for diffusers attention modules whose attention runs over the sequence group.

Each computes what the diffusers processor of that module computes (projections, q/k norms, RoPE, output
projections; the references are named per class) on this rank's tokens, and hands the attention itself, on
(B, S_r, H, D) q, k, v, to a registered strategy's kernel (Ulysses all-to-all, ring, USP) built for the per-rank
token sizes of the streams it attends over (`SequenceState`, integrations/diffusers_parallel.py). Processors are set
per module with `module.set_processor`, never globally.
"""

from __future__ import annotations

import torch


class SequenceParallelProcessor:
    """Base: `streams` the module attends over, in the order its sequence concatenates them on each rank."""

    streams: tuple[str, ...] = ("image",)

    def __init__(self, state, kernels, streams: tuple[str, ...] | None = None):
        self.state, self.kernels = state, kernels
        if streams is not None:
            self.streams = streams

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, S_r, H, D) x3 -> (B, S_r, H, D) over the sequence group (S_r: this rank's tokens of the streams)."""
        core = self.kernels(self.state.joint_sizes(self.streams))
        return core(q, k, v)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1))  # (B, S, H * D) -> (B, S, H, D)


class SelfAttentionProcessor(SequenceParallelProcessor):
    """diffusers `Attention` with AttnProcessor2_0, self-attention without a mask (DiT and PixArt attn1, SD3.5's
    attn2): q/k/v projections, optional q/k norms over head_dim, attention, to_out, residual and rescale."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError("sequence-parallel self-attention takes no encoder states or mask")
        residual = hidden_states
        q, k, v = (_heads(proj(hidden_states), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:  # over head_dim: the same on (B, S, H, D) as on diffusers' (B, H, S, D)
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = self.attend(q, k, v).flatten(2).to(q.dtype)  # (B, S_r, H * D)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class JointAttentionProcessor(SequenceParallelProcessor):
    """SD3's joint attention (diffusers JointAttnProcessor2_0): image tokens then text tokens in one sequence; the
    text part's output goes through to_add_out unless the block is context_pre_only (the last one)."""

    streams = ("image", "text")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("sequence-parallel joint attention takes no mask")
        q, k, v = (_heads(proj(hidden_states), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q = attn.norm_q(q) if attn.norm_q is not None else q
        k = attn.norm_k(k) if attn.norm_k is not None else k
        streams = ("image",)
        if encoder_hidden_states is not None:
            projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            tq, tk, tv = (_heads(proj(encoder_hidden_states), attn.heads) for proj in projections)
            tq = attn.norm_added_q(tq) if attn.norm_added_q is not None else tq
            tk = attn.norm_added_k(tk) if attn.norm_added_k is not None else tk
            q, k, v = (torch.cat(pair, dim=1) for pair in ((q, tq), (k, tk), (v, tv)))  # (B, S_img,r + S_txt,r, H, D)
            streams = self.streams
        core = self.kernels(self.state.joint_sizes(streams))
        out = core(q, k, v).flatten(2).to(q.dtype)  # (B, S_r, H * D)
        image = hidden_states.shape[1]
        out, text = out[:, :image], out[:, image:]
        out = attn.to_out[1](attn.to_out[0](out))
        if encoder_hidden_states is None:
            return out
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return out, text


class FluxAttentionProcessor(SequenceParallelProcessor):
    """Flux (diffusers FluxAttnProcessor): double-stream blocks project text with add_*_proj and put it first;
    single-stream blocks get [text; image] already concatenated. RoPE (from the split txt_ids/img_ids, so it matches
    the local tokens) is applied to the joint q and k."""

    streams = ("text", "image")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise NotImplementedError("sequence-parallel Flux attention takes no mask")
        q, k, v = (_heads(proj(hidden_states), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            tq, tk, tv = (_heads(proj(encoder_hidden_states), attn.heads) for proj in projections)
            tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
            q, k, v = (torch.cat(pair, dim=1) for pair in ((tq, q), (tk, k), (tv, v)))  # (B, S_txt,r + S_img,r, H, D)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = self.attend(q, k, v).flatten(2).to(q.dtype)  # (B, S_r, H * D)
        if encoder_hidden_states is None:
            return out  # single-stream: the block splits text and image itself
        text_len = encoder_hidden_states.shape[1]
        text, out = out[:, :text_len], out[:, text_len:]
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(text.contiguous())


def _wan_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE on (B, S, H, D): pairs (x[2i], x[2i+1]) rotated by the per-token angles."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, H, D/2) each
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSelfAttentionProcessor(SequenceParallelProcessor):
    """Wan's self-attention (diffusers WanAttnProcessor with no encoder states): q/k RMS norms over the whole hidden
    dim (per token, so before any exchange), interleaved RoPE from the split rotary embedding, attention, to_out."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError("sequence-parallel Wan self-attention takes no encoder states or mask")
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)  # (B, S_r, H * D)
        q, k, v = (_heads(t, attn.heads) for t in (q, k, v))
        if rotary_emb is not None:
            q, k = _wan_rotary(q, *rotary_emb), _wan_rotary(k, *rotary_emb)
        out = self.attend(q, k, v).flatten(2).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


PROCESSORS = {
    "self": SelfAttentionProcessor,
    "joint": JointAttentionProcessor,
    "flux": FluxAttentionProcessor,
    "wan_self": WanSelfAttentionProcessor,
}
