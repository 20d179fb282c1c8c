"""Issue 13's acceptance at full size: DiT-XL/2, 512 px, an official-format fp32 checkpoint (2.7 GB, written once
under benchmarks/results/whole_cache/), a small VAE, one step: the largest rank's whole-command peak with sharded
weights is <= 0.5x one process at 4 ranks and <= 0.7x at 2, and the images equal one process's.

About 4 minutes and 6 GB of disk on 2 CPU cores, so it runs on request: `make test-xl` (OPENDIT_XL=1). The same
measurement, with interleaved passes, is `python benchmarks/memory.py --whole` (docs/memory.md's table). The suite's own
checks of the same properties at a smaller size: test_sharded_loading.py (1/P + one block at every moment of loading
and sampling), test_memory_fit.py (a budget below one process runs sharded and stays within it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("OPENDIT_XL") != "1", reason="4 minutes, 6 GB: run with make test-xl"),
]


def test_xl_whole_command_peak_with_sharded_weights(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from whole_command import CONFIGS, table, whole_command

    saved = dict(CONFIGS)
    CONFIGS.pop("4 ranks unsharded")  # not part of the acceptance: saves a minute
    try:
        result = whole_command("DiT-XL/2", 512, 1, tmp_path)
    finally:
        CONFIGS.clear()
        CONFIGS.update(saved)
    print(table(result))
    configs = result["configs"]
    assert configs["4 ranks sharded"]["ratio_vs_1_process"] <= 0.5, configs
    assert configs["2 ranks sharded"]["ratio_vs_1_process"] <= 0.7, configs
    for name, entry in configs.items():
        assert entry["max_image_diff_vs_1_process"] <= 1, (name, entry)  # <= 1/255
        if "sharded" in name:
            assert all(load["mode"] == "sharded" for load in entry["loading"]), entry["loading"]
