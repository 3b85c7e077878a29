"""The benchmark scripts still run: the GPU benchmark's CPU smoke mode, the backbone benchmark at 32 px, the
augmentation benchmark at 32 px, the sharding benchmark on a tiny ViT, the GPU check on a machine without one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import ENV, ROOT


def run_benchmark(cmd: list[str]) -> None:
    """Run a benchmark script to the end, whatever the machine's load: one thread per process (ENV), as the
    other tests' launches (an OpenMP pool per process spins for cores that a loaded machine does not have),
    and a limit that only a hang reaches (its CPU smoke takes 25-70 s alone on 2 cores, several times that
    at a load of 10: 300 s was not enough); a failure shows the script's stderr."""
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_the_gpu_benchmark_runs_end_to_end_in_its_cpu_smoke_mode(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu_throughput.py"),
        "--cpu-smoke",
        "--steps",
        "2",
        "--workers",
        "1",
        "--models",
        "simclr_resnet18_32px",
        "--out",
        str(out),
    ]
    run_benchmark(cmd)
    results = json.loads(out.read_text())["results"]
    for mode in ("ddp", "zero2"):  # the ZeRO-2 row in bf16 could not start before DeepSpeed's torch_autocast
        result = results[f"simclr_resnet18_32px/{mode}"]
        assert "error" not in result, result
        assert result["images_per_second"] > 0 and result["batch_per_gpu"] == 4


@pytest.mark.slow
def test_the_backbone_benchmark_times_both_encoders_side_by_side(tmp_path):
    out = tmp_path / "backbones.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "backbone_throughput.py"), "--batch", "2", "--steps", "1"]
    run_benchmark([*cmd, "--sizes", "32", "--out", str(out)])
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"resnet50_32px", "vit_s16_32px"}
    assert all(r["images_per_second"] > 0 for r in report["results"].values())
    assert report["images_per_second_ratios"]["vit_s16_over_resnet50_32px"] > 0


@pytest.mark.slow
def test_the_augmentation_benchmark_measures_every_setting_both_ways(tmp_path):
    out = tmp_path / "augment.json"
    script = str(ROOT / "benchmarks" / "augment_throughput.py")
    sizes = ["--images", "3", "--repeats", "1", "--size", "32", "--local-size", "16", "--batch", "4"]
    run_benchmark([sys.executable, script, *sizes, "--device-repeats", "1", "--device", "cpu", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"simclr_2x32", "byol_asymmetric_2x32", "multicrop_2x32_6x16"}
    for result in results.values():
        assert all(rate > 0 for rate in result["worker_images_per_second"].values())
        assert result["device_views_per_second"]  # measured, or skipped with the reason
    assert results["multicrop_2x32_6x16"]["views"] == 8 and results["multicrop_2x32_6x16"]["goal_split_over_full"] == 5


@pytest.mark.slow
def test_the_sharding_benchmark_counts_each_ranks_state_under_ddp_fsdp2_and_zero(tmp_path):
    out = tmp_path / "sharding.json"
    tiny = ["--model", "vit_tiny_patch16_224", "--image-size", "32", "--warmup", "1", "--steps", "1", "--rounds", "1"]
    run_benchmark([sys.executable, str(ROOT / "benchmarks" / "sharding_memory.py"), *tiny, "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["processes"] == 2 and report["cores"] and report["torch"] == torch.__version__
    model = report["models"]["vit_tiny_patch16_224"]
    assert set(model["results"]) == {"ddp", "fsdp2", "zero2", "zero3"}
    categories = ("parameters", "gradients", "optimizer_state")
    for name, result in model["results"].items():
        assert "error" not in result, (name, result)
        assert result["step_seconds_median"] > 0 and result["state_bytes_same_every_round"]
        (launch,) = result["rounds"]
        assert len(launch["per_rank"]) == 2 and len(launch["step_seconds"]) == 1
        for rank in launch["per_rank"]:
            assert rank["state_bytes"] == sum(rank[f"{c}_bytes"] for c in categories) > 0
            assert rank["peak_rss_bytes"] > rank["state_bytes"]
    ddp = model["results"]["ddp"]["rounds"][0]["per_rank"][0]
    assert ddp["gradients_bytes"] == ddp["parameters_bytes"]
    assert ddp["optimizer_state_bytes"] >= 2 * ddp["parameters_bytes"]  # AdamW's two moments (and its steps)
    # FSDP2 shards parameters, gradients and AdamW's moments over the 2 ranks: about half of DDP's on each
    state = {name: ratio["state_bytes_max_rank"] for name, ratio in model["ratios"].items()}
    assert 0.45 < state["fsdp2_over_ddp"] < 0.55 and model["goals"]["fsdp2_state_over_ddp"]["met"]
    assert state["fsdp2_over_ddp"] < state["zero3_over_ddp"] < state["zero2_over_ddp"] < 1
    assert all(len(ratio["step_seconds_median_per_round"]) == 1 for ratio in model["ratios"].values())


def test_the_sharding_benchmark_stops_a_launch_when_the_machine_runs_short_of_memory():
    from benchmarks.sharding_memory import available_gib, watch

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    left = watch(proc, floor_gib=available_gib() + 1000)  # a floor no machine has: stopped at once
    assert left is not None and proc.returncode == -9
    done = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    assert watch(done, floor_gib=0.0) is None and done.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_the_gpu_check_says_there_is_no_gpu_and_succeeds_on_a_cpu_machine():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "augssl gpu_check: no GPU (torch sees no CUDA device)" in proc.stdout


def test_the_methods_table_aggregates_seeds_and_judges_directions_on_the_means(tmp_path):
    from benchmarks.fashionmnist_methods import summarise

    def run(seed: int, vae: float, aavae: float, steps: int = 10) -> dict:
        method = lambda acc: {"accuracies": {"fast": acc, "linear": acc, "knn": 0.8}, "train_seconds": 3.0 + seed}  # noqa: E731
        return {
            "steps": steps,
            "seed": seed,
            "linear_epochs": 2,
            "results": {"vae": method(vae), "aavae": method(aavae)},
        }

    for seed, (vae, aavae) in enumerate([(0.85, 0.86), (0.86, 0.86), (0.87, 0.89)]):
        (tmp_path / f"m_seed{seed}.json").write_text(json.dumps(run(seed, vae, aavae)))
    (tmp_path / "m_seed9.json").write_text(json.dumps(run(9, 0.1, 0.1, steps=99)))  # other settings: left out
    summary = summarise(tmp_path, "m", steps=10, linear_epochs=2)
    assert summary["seeds"] == [0, 1, 2]
    vae = summary["methods"]["vae"]
    assert vae["linear"] == {"values": [85.0, 86.0, 87.0], "mean": 86.0, "std": 1.0} and vae["train_seconds"] == 4.0
    direction = summary["paper_directions_linear"]["AAVAE > VAE"]
    assert (
        direction["holds"] and direction["gap_points"] == 1.0 and direction["gap_over_seed_std"] == 0.58
    )  # 1 / sqrt(3)
