"""diffusers' own context parallelism made runnable on CPU-only torch, for benchmarks/vs_diffusers.py only.

Workaround (a) (CPU device / mesh) and (b) (ring with a CPU log-sum-exp forward op) are described in
vs_diffusers.py's docstring; they are bound to model instances and per-module processors here, nothing global of
diffusers is changed. Also here: the raw stock failures (recorded, not hidden) and a TorchDispatchMode that counts
the bytes diffusers' functional collectives send.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from bench_pools import shared_copy

ROOT = Path(__file__).resolve().parents[1]


def _cpu_resolve_parallel_config(self, config):
    """WORKAROUND (a): ModelMixin._resolve_parallel_config (modeling_utils.py:1697-1740) with device "cpu" and a CPU
    DeviceMesh instead of `torch.device(accel, rank % torch.accelerator.device_count())` (line 1719: division by zero
    on CPU-only torch). Bound to one model instance; nothing global changes."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    if isinstance(config, ContextParallelConfig):
        config = ParallelConfig(context_parallel_config=config)
    cp = config.context_parallel_config
    mesh = cp.mesh or init_device_mesh("cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    self._parallel_config = config
    return config


def _cpu_lse_forward_op(
    ctx,
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    return_lse=False,
    _save_ctx=True,
    _parallel_config=None,
):
    """WORKAROUND (b): a forward op with diffusers' forward-op signature (cf. _native_flash_attention_forward_op,
    attention_dispatch.py:1074-1120) on the CPU flash kernel, which returns the logsumexp. (B, S, H, D) in and out;
    lse (B, S, H) float32. Inference only (no ctx saved)."""
    if enable_gqa:
        raise ValueError("enable_gqa is not supported by the benchmark-local CPU LSE op")
    q, k, v = (x.transpose(1, 2).contiguous() for x in (query, key, value))  # (B, H, S, D), as _native_flash does
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )
    out = out.transpose(1, 2).contiguous()
    lse = lse.transpose(1, 2).contiguous()
    return (out, lse) if return_lse else out


def _ring_cpu_attention(query, key, value, parallel_config):
    """diffusers' own templated context-parallel attention (ring for ring_degree > 1) with the CPU LSE op."""
    from diffusers.models.attention_dispatch import _native_attention_backward_op, _templated_context_parallel_attention

    return _templated_context_parallel_attention(
        query,
        key,
        value,
        None,
        0.0,
        False,
        None,
        False,
        False,
        forward_op=_cpu_lse_forward_op,
        backward_op=_native_attention_backward_op,
        _parallel_config=parallel_config,
    )


def _ring_processor_classes():
    """WORKAROUND (b) processors: diffusers' FluxAttnProcessor / WanAttnProcessor code (transformer_flux.py:76-142,
    transformer_wan.py:68-162, I2V branch omitted) with `dispatch_attention_fn(...)` replaced by _ring_cpu_attention."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections as flux_qkv
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor
    from diffusers.models.transformers.transformer_wan import _get_qkv_projections as wan_qkv

    class FluxRingCpuLseProcessor(FluxAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            if attention_mask is not None:
                raise NotImplementedError("benchmark-local ring processor: no mask")
            query, key, value, encoder_query, encoder_key, encoder_value = flux_qkv(
                attn, hidden_states, encoder_hidden_states
            )
            query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
            key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
            value = value.unflatten(-1, (-1, attn.head_dim))
            if attn.added_kv_proj_dim is not None:
                encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
                encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
                encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
                query = torch.cat([encoder_query, query], dim=1)
                key = torch.cat([encoder_key, key], dim=1)
                value = torch.cat([encoder_value, value], dim=1)
            if image_rotary_emb is not None:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
            hidden_states = _ring_cpu_attention(query, key, value, self._parallel_config)  # <- the one change
            hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
            if encoder_hidden_states is not None:
                encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                    [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
                )
                hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
                return hidden_states, encoder_hidden_states
            return hidden_states

    class WanRingCpuLseProcessor(WanAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            if encoder_hidden_states is not None or attn.add_k_proj is not None:
                # cross-attention: diffusers runs it without CP (parallel_config=None), unchanged
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
            if attention_mask is not None:
                raise NotImplementedError("benchmark-local ring processor: no mask")
            query, key, value = wan_qkv(attn, hidden_states, None)
            query, key = attn.norm_q(query), attn.norm_k(key)
            query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
            if rotary_emb is not None:

                def rotate(x, freqs_cos, freqs_sin):
                    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
                    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
                    out = torch.empty_like(x)
                    out[..., 0::2] = x1 * cos - x2 * sin
                    out[..., 1::2] = x1 * sin + x2 * cos
                    return out.type_as(x)

                query, key = rotate(query, *rotary_emb), rotate(key, *rotary_emb)
            hidden_states = _ring_cpu_attention(query, key, value, self._parallel_config)  # <- the one change
            hidden_states = hidden_states.flatten(2, 3).type_as(query)
            return attn.to_out[1](attn.to_out[0](hidden_states))

    return FluxRingCpuLseProcessor, WanRingCpuLseProcessor


def _context_parallel_config(mode: str):
    from diffusers.models._modeling_parallel import ContextParallelConfig

    return ContextParallelConfig(ulysses_degree=2) if mode == "ulysses" else ContextParallelConfig(ring_degree=2)


def apply_diffusers_cp(model, kind: str, mode: str) -> None:
    """diffusers' own enable_parallelism with workaround (a); for ring also workaround (b)."""
    import types

    if mode == "ring":
        flux_cls, wan_cls = _ring_processor_classes()
        pattern = ("transformer_blocks.", "single_transformer_blocks.") if kind == "flux" else ("blocks.",)
        for path, module in model.named_modules():
            if kind == "flux" and path.endswith(".attn") and path.startswith(pattern):
                module.set_processor(flux_cls())
            elif kind == "wan" and path.endswith(".attn1"):
                module.set_processor(wan_cls())
    model._resolve_parallel_config = types.MethodType(_cpu_resolve_parallel_config, model)  # (a), this instance
    model.enable_parallelism(config=_context_parallel_config(mode))


def _failure(exc: BaseException) -> dict:
    frames = traceback.extract_tb(exc.__traceback__)
    where = [f"{_short(f.filename)}:{f.lineno} in {f.name}: {f.line}" for f in frames[-4:]]
    ours = [f for f in frames if "/diffusers/" in f.filename or "/opendit/" in f.filename]
    at = f"{_short(ours[-1].filename)}:{ours[-1].lineno} in {ours[-1].name}: {ours[-1].line}" if ours else ""
    return {
        "error": f"{type(exc).__name__}: {exc}",
        "raised_at": where[-1] if where else "",
        "library_frame": at,  # the innermost diffusers / opendit frame
        "last_frames": where,
    }


def _short(path: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def stock_failures(kind: str, model, inputs: dict) -> dict:
    """The stock diffusers calls on CPU-only torch, each on a throwaway copy; the raw failures."""
    out = {}
    for mode in ("ulysses", "ring"):
        trial = shared_copy(model)
        key = f"enable_parallelism(config=ContextParallelConfig({mode}_degree=2))"
        try:
            trial.enable_parallelism(config=_context_parallel_config(mode))
            with torch.no_grad():
                trial(**inputs)
            out[key] = {"error": None, "note": "ran without error"}
        except Exception as exc:  # noqa: BLE001 - the failure is what we record
            out[key] = _failure(exc)
    # past (a): diffusers' ring with its stock processors on the default (native) backend, and with `_native_flash`
    # set per module (AttentionModuleMixin.set_attention_backend: the processor only, no global change)
    for backend in (None, "_native_flash"):
        trial = shared_copy(model)
        key = f"ring with workaround (a) only, backend {backend or 'native (default)'}: first forward"
        try:
            if backend is not None:
                for module in trial.modules():
                    if hasattr(module, "set_attention_backend") and hasattr(module, "processor"):
                        module.set_attention_backend(backend)
            trial._resolve_parallel_config = __import__("types").MethodType(_cpu_resolve_parallel_config, trial)
            trial.enable_parallelism(config=_context_parallel_config("ring"))
            with torch.no_grad():
                trial(**inputs)
            out[key] = {"error": None, "note": "ran without error"}
        except Exception as exc:  # noqa: BLE001
            out[key] = _failure(exc)
    return out


class CollectiveBytes:
    """Counts the functional collectives issued on this thread while active (a TorchDispatchMode: a context
    manager, not a patch): bytes this rank sends to other ranks, per op name."""

    COLLECTIVES = (
        "all_to_all_single",
        "all_gather_into_tensor",
        "all_gather_single",
        "all_gather_into_tensor_coalesced",
        "reduce_scatter_tensor",
        "all_reduce",
        "broadcast",
    )

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if getattr(func, "namespace", "") != "_c10d_functional":
                    return func(*args, **kwargs)
                counter.record(func, args, kwargs)
                start = time.perf_counter()
                out = func(*args, **kwargs)
                counter.seconds += time.perf_counter() - start  # issue + wait_tensor: this rank's blocked time
                return out

        self.mode = _Mode()
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.other_ops: dict[str, int] = {}
        self.seconds = 0.0

    def record(self, func, args, kwargs) -> None:
        from torch.distributed.distributed_c10d import _resolve_process_group

        name = func.overloadpacket.__name__
        if name not in self.COLLECTIVES:  # wait_tensor, _wrap_tensor_autograd: bookkeeping, no data moves
            self.other_ops[name] = self.other_ops.get(name, 0) + 1
            return
        x = args[0]
        group_name = kwargs.get("group_name", args[-1])
        group = _resolve_process_group(group_name) if isinstance(group_name, str) else None
        size = group.size() if group is not None else dist.get_world_size()
        me = dist.get_rank(group) if group is not None else dist.get_rank()
        nbytes = x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0
        if name == "all_to_all_single":
            splits = args[2] if len(args) > 2 else kwargs.get("input_split_sizes")
            if splits:
                sent = nbytes - nbytes * splits[me] // x.shape[0]
            else:
                sent = nbytes * (size - 1) // size
        elif name in ("all_gather_into_tensor", "all_gather_single"):
            sent = nbytes * (size - 1)
        elif name == "broadcast":
            sent = nbytes * (size - 1) if me == args[1] else 0
        else:  # reductions (not used by diffusers' CP here): count the input once so it shows up
            sent = nbytes
        self.bytes[name] = self.bytes.get(name, 0) + int(sent)
        self.calls[name] = self.calls.get(name, 0) + 1

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)
