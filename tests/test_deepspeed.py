"""The one trainer under DeepSpeed ZeRO-2 (2 CPU processes over gloo): it trains, writes a full
model.safetensors for inference, and a SIGKILLed launch resumes with the same weights, schedule and
data position (its first step after the checkpoint logs the uninterrupted run's loss); DeepSpeed's
sharded optimizer moments restart, with a warning."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import deepspeed  # noqa: F401 - a dev dependency; the launch below needs it
import pytest

from tessera.modeling import TesseraModel
from tiny_runs import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]


def _launch_command(recipe: Path, out: Path, *extra: str) -> tuple[list[str], dict[str, str]]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "launch" / "accelerate" / "zero2.yaml"), "--num_processes", "2", "--main_process_port", "0",
               "-m", "tessera.cli", "train", "--config", str(recipe), f"out={out}", *extra]
    return command, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def _launch(recipe: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command, env = _launch_command(recipe, out, *extra)
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=400)


def test_zero2_trains_saves_and_resumes_like_an_uninterrupted_run(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe(tmp_path, train={"steps": 60, "lr": 5e-3, "warmup_steps": 0, "ckpt_every": 4}).to_yaml())
    whole = _launch(recipe, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert whole.stdout.count("done: step 60") == 1  # printed once per launch, not per rank
    model = TesseraModel.from_pretrained(tmp_path / "whole" / "checkpoints" / "step-0000060")
    assert model.kind == "next_token"  # the full weights, loadable without DeepSpeed
    # SIGKILL the whole launch once its first checkpoint exists, then resume it
    command, env = _launch_command(recipe, tmp_path / "killed")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    while not latest.exists():
        assert proc.poll() is None, "the launch ended before its first checkpoint"
        time.sleep(0.05)
    assert proc.poll() is None, "the launch ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed_from = int(latest.read_text().split("-")[1])
    resumed = _launch(recipe, tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "optimizer moments start afresh" in resumed.stderr
    losses = [{row["step"]: row["loss"] for row in map(json.loads, (tmp_path / run / "log.jsonl").read_text().splitlines())}
              for run in ("whole", "killed")]
    assert sorted(losses[1]) == list(range(1, 61))
    for step in range(1, resumed_from + 2):  # the step after the checkpoint needs no optimizer moments
        assert losses[1][step] == pytest.approx(losses[0][step], rel=1e-3), f"step {step}, resumed from {resumed_from}"
