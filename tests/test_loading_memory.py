"""Lean loading: peak resident memory while loading a checkpoint is about the model's bytes in the target dtype.

Method: the load runs in a fresh subprocess. It first imports torch and opendit and reads its current resident set
(VmRSS: the bare interpreter + torch + opendit, ~0.38 GB here); that baseline is subtracted from the process's peak
resident set (VmHWM, the kernel's high-water mark) after the load. The difference is compared with the model's bytes
in the target dtype. File pages in the page cache are not resident-set pages, so they do not count; pages of a file that
is memory-mapped and read DO count, which is what the old mmap path got wrong (3.0x, see checkpoint.py).
"""

import json
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

from opendit.io.checkpoint import load_model, read_state_dict
from opendit.models.dit import build_dit, preset

BOUND = 1.3  # acceptance: peak <= 1.3x the model's bytes in the target dtype

_ST_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_synthetic_safetensors(path, config, dtype=torch.float32) -> int:
    """A checkpoint of `config`'s exact layout, streamed to disk 16 MB at a time (the writer never holds the model).

    Values are a constant: loading cost does not depend on them. Returns the data bytes.
    """
    model = build_dit(config, device="meta")
    header, offset, sizes = {}, 0, []
    for key, value in model.state_dict().items():
        nbytes = value.numel() * dtype.itemsize
        header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(value.shape), "data_offsets": [offset, offset + nbytes]}
        sizes.append(value.numel())
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    chunk = torch.full((1 << 22,), 0.01, dtype=dtype).view(torch.uint8).numpy()  # 4M elements as bytes
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for numel in sizes:
            while numel:
                n = min(numel, 1 << 22)
                handle.write(chunk[: n * dtype.itemsize].tobytes())
                numel -= n
    return offset


_PROBE = textwrap.dedent(
    """
    import json, sys, time
    import torch
    import opendit.engine  # what `opendit sample` has imported before it loads (diffusers, the sampler, ...)
    from opendit.io.checkpoint import load_model
    from opendit.models.dit import preset
    from opendit.models.precision import parse_dtype

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    base = status("VmRSS")
    start = time.perf_counter()
    model = load_model(preset(sys.argv[2]), sys.argv[1], dtype=parse_dtype(sys.argv[3]))
    seconds = time.perf_counter() - start
    peak = status("VmHWM")
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps({"base": base, "peak": peak, "model_bytes": model_bytes, "seconds": seconds}))
    """
)


def measure_load(path, model: str, dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(path), model, dtype], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["ratio"] = (result["peak"] - result["base"]) / result["model_bytes"]
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS/VmHWM from /proc")
@pytest.mark.slow
def test_xl2_fp32_safetensors_loads_into_bf16_within_1_3x(tmp_path):
    """DiT-XL/2 (675M parameters): a 2.7 GB fp32 file into a 1.35 GB bf16 model. Measured: 1.19x (was 3.0x)."""
    path = tmp_path / "xl2.safetensors"
    data_bytes = write_synthetic_safetensors(path, preset("DiT-XL/2"))
    assert data_bytes == 675_129_632 * 4
    result = measure_load(path, "DiT-XL/2", "bf16")
    assert result["model_bytes"] == 675_129_632 * 2
    print(f"XL/2 fp32 -> bf16: peak {result['ratio']:.2f}x model bytes, {result['seconds']:.1f} s")
    assert result["ratio"] <= BOUND, result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS/VmHWM from /proc")
@pytest.mark.slow
def test_pt_mmap_pages_are_released_while_loading(tmp_path):
    """A torch.save'd fp32 DiT-B/2 (.pt, opened with mmap) into bf16: mapped pages are dropped after each tensor.

    Measured: 1.07x; without the madvise release 3.0x (the fp32 file's pages stay resident).
    """
    path = tmp_path / "b2.pt"
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, torch; from opendit.models.dit import build_dit, preset; "
            "m = build_dit(preset('DiT-B/2'), device='meta').to_empty(device='cpu'); "
            "[t.fill_(0.01) for t in m.state_dict().values()]; torch.save(m.state_dict(), sys.argv[1])",
            str(path),
        ],
        check=True,
        timeout=300,
    )
    result = measure_load(path, "DiT-B/2", "bf16")
    print(f"B/2 .pt fp32 -> bf16: peak {result['ratio']:.2f}x model bytes, {result['seconds']:.1f} s")
    assert result["ratio"] <= BOUND, result


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_reader_is_exact(tmp_path, tiny_config, suffix, dtype):
    """Values survive the per-tensor read + cast bit for bit (the cast itself being the only rounding)."""
    source = build_dit(tiny_config)
    path = tmp_path / f"m{suffix}"
    if suffix == ".pt":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    state = read_state_dict(path)
    assert sorted(state) == sorted(source.state_dict())
    loaded = load_model(tiny_config, path, dtype=dtype)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.to(dtype)), key
    # The model never aliases the file's mapping: writing to it must not touch the file or other tensors.
    with torch.no_grad():
        loaded.pos_embed.add_(1)
    assert torch.equal(read_state_dict(path)["pos_embed"], source.pos_embed)
