"""--dtype auto: bf16 where this device computes it fast (calibrated) and the model documents its drift, else fp32;
the planner's cost model in either dtype (speeds_in_dtype)."""

from dataclasses import replace

import pytest

from opendit.api.generation import GenerationRequest, resolve_engine
from opendit.distributed.config import ParallelConfig
from opendit.errors import OpenDiTError
from opendit.models.dit import preset
from opendit.models.precision import AUTO_MIN_SPEEDUP, choose_dtype
from opendit.planning import speeds as speeds_module
from opendit.planning.calibrate import half_precision_gain
from opendit.planning.cost import predict_step_time
from opendit.planning.speeds import DEFAULTS, speeds_in_dtype

DRIFT = "55 dB PSNR"


def test_choose_dtype_needs_both_the_speed_and_the_documented_drift():
    assert choose_dtype(3.4, DRIFT, "calibrated")[0] == "bf16"
    name, why = choose_dtype(AUTO_MIN_SPEEDUP - 0.05, DRIFT, "calibrated")
    assert name == "fp32" and "1.20x" in why
    name, why = choose_dtype(1.0, DRIFT, "default")
    assert name == "fp32" and "opendit calibrate" in why  # never measured: says how to measure it
    name, why = choose_dtype(10.0, None, "calibrated")
    assert name == "fp32" and "documents no bf16 drift" in why


def test_speeds_in_dtype_scales_compute_and_element_size_both_ways():
    cpu = replace(DEFAULTS["cpu-gloo"], half_speedup=3.0)  # calibrated in fp32
    half = speeds_in_dtype(cpu, 2)
    assert half.matmul_flops == pytest.approx(3.0 * cpu.matmul_flops) and half.dtype_bytes == 2
    assert half.attn_flops == pytest.approx(3.0 * cpu.attn_flops) and half.mem_bw == cpu.mem_bw
    assert speeds_in_dtype(cpu, 4) is cpu
    gpu = DEFAULTS["h100-nvlink"]  # documented in bf16: fp32 is the slow one
    full = speeds_in_dtype(gpu, 4)
    assert full.matmul_flops == pytest.approx(gpu.matmul_flops / gpu.half_speedup) and full.dtype_bytes == 4
    # the cost model follows: a bf16 step is predicted faster than an fp32 one on both, by less than the matmul gain
    model = replace(preset("DiT-XL/2"), depth=4, input_size=(64, 64))
    for speeds in (cpu, gpu):
        plan = ParallelConfig(ulysses=2)
        t16 = predict_step_time(model, 1024, 1, plan, speeds_in_dtype(speeds, 2), guided=False).total_s
        t32 = predict_step_time(model, 1024, 1, plan, speeds_in_dtype(speeds, 4), guided=False).total_s
        assert t16 < t32 <= t16 * speeds.half_speedup * 1.01


def test_calibration_measures_the_bf16_gain_of_a_block():
    seconds = half_precision_gain(64, 4, reps=2, tokens=16)
    assert seconds["fp32"] > 0 and seconds["bf16"] > 0


@pytest.mark.parametrize("gain, want", [(3.0, "bf16"), (1.0, "fp32")])
def test_engine_resolves_auto_once_with_a_note(monkeypatch, gain, want):
    fake = replace(DEFAULTS["cpu-gloo"], half_speedup=gain, source="test speeds")
    monkeypatch.setattr(speeds_module, "resolve_speeds", lambda *a, **k: fake)
    spec = resolve_engine(GenerationRequest(classes=[0], dtype="auto"))
    assert spec.settings.dtype == want  # every rank reads a concrete dtype
    assert any(n.startswith(f"--dtype auto -> {want}") for n in spec.plan_notes), spec.plan_notes
    explicit = resolve_engine(GenerationRequest(classes=[0], dtype="fp16"))
    assert explicit.settings.dtype == "fp16" and not any("--dtype auto" in n for n in explicit.plan_notes)


def test_unknown_dtype_names_auto_too():
    with pytest.raises(OpenDiTError, match="fp32, bf16, fp16, auto"):
        resolve_engine(GenerationRequest(classes=[0], dtype="bf17"))
