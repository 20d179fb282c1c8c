import os

# The CPU suite hides CUDA (its tolerances are CPU's, its process groups gloo): `make test` on a GPU machine stays the
# CPU suite. The GPU lane (tests/gpu, `make test-gpu`) sets OPENDIT_GPU=1. Set before torch initialises CUDA.
if os.environ.get("OPENDIT_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread per test process: the machine has 2 cores and multi-process tests spawn their own workers.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


# The sweep tier (`make test-sweeps`, marker `sweep`), out of `make test`'s 15 minutes on 2 cores: checks that
# `make test` makes at 2 processes (or on one family) repeated at 3-4 processes, in bf16 or on every family, and the
# slow quality and scale checks, and the server on the new image families' folders. One list, here, so the tier
# reads in one place (node id prefixes).
SWEEP = (
    "test_video_families.py::test_processes_equal_one_process[3]",
    "test_video_families.py::test_processes_equal_one_process[4]",
    "test_video_families.py::test_bf16_processes_equal_one_bf16_process",
    "test_image_families.py::test_three_and_four_processes_with_uneven_tokens",
    "test_image_families.py::test_bf16_equals_one_bf16_process",
    "test_vae_split.py::test_split_decode_equals_one_process[kl-3-10]",
    "test_vae_split.py::test_split_decode_equals_one_process[kl-4-5]",
    "test_vae_split.py::test_split_decode_equals_one_process[wan-3-8]",
    "test_vae_split.py::test_split_decode_equals_one_process[wan-4-6]",
    "test_encoders_once.py::test_encoders_once_equal_every_rank_encoding_on_each_family",  # Flux's stays in
    "test_encoders_once.py::test_broadcast_output_rebuilds_model_outputs_tuples_and_dicts[3]",
    "test_diffusers_parallel.py::test_diffusers_modules_equal_one_process[3]",
    "test_diffusers_parallel.py::test_diffusers_modules_equal_one_process[4]",
    "test_diffusers_parallel.py::test_diffusers_tensor_parallel_equals_one_process[4]",
    "test_shard.py::test_per_rank_parameter_memory_is_1_over_p_plus_one_block[4]",
    "test_sharded_loading.py::test_per_rank_memory_while_loading_and_sampling_is_1_over_p_plus_one_block[4-",
    "test_video_cli.py::test_cli_video_frames_equal_single_process[cfg-dsp4]",
    "test_cache_cli.py::test_n_processes_with_a_cache_equal_one[fastseq-3-",
    "test_cache_cli.py::test_n_processes_with_a_cache_equal_one[usp-4-",
    "test_precision.py::test_shipped_digits_model_half_precision_quality",  # quality: ~90 s
    "test_video_quality.py::",
    "test_loading_memory.py::test_xl2_fp32_safetensors_loads_into_bf16_within_1_3x",
    "test_image_families.py::test_serve_on_the_folder_equals_the_cli",  # the server on the new image families
    # second combinations of a capability `make test` already runs end to end at 2 processes (keeping its 15 minutes
    # on a fresh clone of this 2-core machine): the other strategy x cache pairs, the other fault phases, the other
    # CLI plans of a family, the module-level twin of a CLI check
    "test_pipefusion.py::test_synchronous_steps_equal_one_process",  # the CLI twin stays
    "test_loading_memory.py::test_pt_mmap_pages_are_released_while_loading",
    "test_pipeline_failures.py::test_a_rank_failing_in_encode_or_decode_ends_the_job_with_its_message[sharded-encoder]",
    "test_pipeline_failures.py::test_a_rank_failing_in_encode_or_decode_ends_the_job_with_its_message[split-decode-rank0]",
    "test_vae_split.py::test_cli_dit_vae_parallel_two_processes_equal_one[256",  # the engine test runs auto at 256²
    "test_cli_diffusers.py::test_two_processes_equal_one[flux-plan2-all_to_all]",
    "test_cli_diffusers.py::test_two_processes_equal_one[pixart-plan4-all_gather]",
    "test_cli_diffusers.py::test_a_pipeline_writes_every_ranks_trace",
    "test_cli_diffusers.py::test_a_cache_on_sharded_joint_blocks_equals_one_process",
    "test_cache_cli.py::test_n_processes_with_a_cache_equal_one[ulysses-pab]",
    "test_cache_cli.py::test_n_processes_with_a_cache_equal_one[cfg-fbcache]",
    "test_cache_cli.py::test_n_processes_with_a_cache_equal_one[dp-pab]",
    "test_cache.py::test_diffusers_transformers_take_both_caches_on_two_ranks",
    "test_video_cli.py::test_cli_video_frames_equal_single_process[dsp2]",
    "test_video_cli.py::test_cli_video_frames_equal_single_process[ulysses2]",
    "test_video_families.py::test_a_cache_on_sharded_experts_equals_one_process",
    "test_tensor_parallel.py::test_cli_tp_images_equal_single_process[tp2-ulysses2]",
    "test_parallel_equivalence.py::test_cli_parallel_images_equal_single_process[ulysses2]",
    "test_parallel_equivalence.py::test_cli_parallel_images_equal_single_process[usp2x2]",
    "test_pipeline_sharded_loading.py::test_lean_sharded_pipeline_equals_one_process[flux]",
    "test_serve_faults.py::test_sigterm_finishes_in_flight_requests_and_exits_0",
    "test_serve_page.py::",  # needs Chromium (`make browser`, a system package): installed by `make test-sweeps`
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.nodeid.startswith("tests/" + prefix) for prefix in SWEEP):
            item.add_marker(pytest.mark.sweep)


@pytest.fixture
def tiny_config():
    """A DiT-T/2 pixel-space model: 16x16x1 images, 64 tokens, 10 classes."""
    from opendit.models.dit import pixel_config

    return pixel_config("DiT-T/2", 16)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A small 4-channel AutoencoderKL saved as a local folder (x8 down/up-sampling, as sd-vae-ft-*)."""
    from diffusers import AutoencoderKL

    path = tmp_path_factory.mktemp("vae") / "vae"
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1,
    ).save_pretrained(path)  # fmt: skip
    return path
