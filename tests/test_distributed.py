"""Data parallelism on 2 CPU processes (gloo), launched the way users launch it: torchrun."""

import subprocess
import sys

import pytest
import torch

from softprompt import SoftPrompt, train

ARGS = ["--steps", "4", "--batch-size", "8", "--virtual-tokens", "4", "--lr", "0.1", "--no-progress", "--save-every", "2"]


def _torchrun(*argv, procs=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "softprompt", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_processes_train_the_same_prompt_as_one(tiny_model_dir, tiny_base, sentiment_files, tmp_path):
    data = str(sentiment_files[0])
    _torchrun("train", "--data", data, "--model", str(tiny_model_dir), "--output", str(tmp_path / "two"), *ARGS)
    one = train(base=tiny_base, data=data, output=str(tmp_path / "one"), steps=4, batch_size=8, virtual_tokens=4,
                lr=0.1, progress=False)
    two = SoftPrompt.load(tmp_path / "two", tiny_base)
    assert not torch.equal(one.prompt.embeddings, SoftPrompt.initialise(tiny_base, 4, "vocab").embeddings)
    assert torch.allclose(two.embeddings, one.prompt.embeddings, atol=1e-5)
    # Only process 0 wrote the log: one line per step, not two.
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 4


def test_resume_with_another_number_of_processes(tiny_model_dir, tiny_base, sentiment_files, tmp_path):
    data = str(sentiment_files[0])
    kwargs = dict(data=data, steps=4, batch_size=8, virtual_tokens=4, lr=0.1, progress=False, save_every=100)
    full = train(base=tiny_base, output=str(tmp_path / "full"), **kwargs)

    def stop(step, record):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(base=tiny_base, output=str(tmp_path / "cut"), on_step=stop, **kwargs)
    _torchrun("train", "--data", data, "--model", str(tiny_model_dir), "--output", str(tmp_path / "cut"), "--resume",
              *[a for a in ARGS if a not in ("--save-every", "2")], "--save-every", "100")
    assert torch.allclose(SoftPrompt.load(tmp_path / "cut").embeddings, full.prompt.embeddings, atol=1e-5)


def test_accelerate_launch_with_fsdp_sharded_base(tiny_model_dir, tiny_base, sentiment_files, tmp_path):
    pytest.importorskip("accelerate")
    data = str(sentiment_files[0])
    # accelerate's multi-GPU launcher is torchrun underneath; without CUDA our processes use gloo on the CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533", "-m", "softprompt", "train",
           "--data", data, "--model", str(tiny_model_dir), "--output", str(tmp_path / "fsdp"), "--fsdp", *ARGS]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = train(base=tiny_base, data=data, output=str(tmp_path / "one"), steps=4, batch_size=8, virtual_tokens=4,
                lr=0.1, progress=False)
    assert torch.allclose(SoftPrompt.load(tmp_path / "fsdp").embeddings, one.prompt.embeddings, atol=1e-5)


def test_fsdp_without_a_process_group_is_a_clear_error(tiny_model_dir, sentiment_files, tmp_path):
    from softprompt import SoftPromptError

    with pytest.raises(SoftPromptError, match="--fsdp needs a process group"):
        train(model=str(tiny_model_dir), data=str(sentiment_files[0]), output=str(tmp_path / "x"), fsdp=True,
              steps=1, progress=False)


def test_scale_bench_runs_through_torchrun_and_fsdp(tmp_path):
    """The GPU scale script (bench/gpu_scale.py) on a tiny shape on CPU, so it cannot rot before a GPU run."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_scale.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script), "--shape", "tiny",
           "--device", "cpu", "--steps", "3", "--seq-len", "16", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    report = json.loads((tmp_path / "scale-tiny.json").read_text())
    assert report["fsdp"] and report["steps"] == 3 and report["tokens_per_s"] > 0


def test_a_time_budget_run_on_two_processes_ends_on_one_plan(tiny_model_dir, sentiment_files, tmp_path):
    """Each process times its own steps, yet they must run the same steps: the plan and its later corrections are
    process 0's, agreed on at steps every process reaches (a collective one process skipped would hang)."""
    import json

    _torchrun("train", "--data", str(sentiment_files[0]), "--model", str(tiny_model_dir), "--output",
              str(tmp_path / "b"), "--time-budget", "12s", "--epochs", "10000", "--batch-size", "8",
              "--virtual-tokens", "3", "--no-progress", "--save-every", "100000")
    log = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    planned = [r["planned_steps"] for r in log if "planned_steps" in r]
    # The epochs' plan, then the budget's (and its corrections, as many as the time left after a cold start of two
    # processes allows: on a fresh CI machine only the first plan may fit): the budget, not the epochs, ended it.
    assert planned[0] == 60000 and len(planned) >= 2 and planned[-1] == len(log) < 60000
    assert log[-1]["elapsed_s"] < 12
