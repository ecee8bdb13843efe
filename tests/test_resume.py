"""Training that survives faults: SIGKILL at a random moment then --resume reproduces the
uninterrupted run step for step (data position, RNG, optimizer, scheduler, EMA); a crash during a
checkpoint write leaves the previous checkpoint loadable; non-finite steps are skipped, then abort."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tessera.train.state as state_module
from tessera.checkpoint import resolve_checkpoint
from tessera.data.epochs import StreamStart, slot_shards
from tessera.data.loader import make_image_loader
from tessera.generators.masked import MaskGITGenerator
from tessera.train.recipe import Recipe
from tessera.train.trainer import train
from tiny_runs import tiny_recipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume")
    recipe = tiny_recipe(root, "maskgit", images=60, per_shard=16, data={"shuffle_buffer": 8},
                         train={"steps": 40, "batch_size": 6, "lr": 1e-3, "warmup_steps": 5, "ckpt_every": 8,
                                "keep_checkpoints": 2})
    (root / "recipe.yaml").write_text(recipe.to_yaml())
    return {"root": root, "recipe": root / "recipe.yaml", "shards": root / "shards"}


def _losses(run: Path) -> dict[int, float]:
    """The loss logged at each step (the last line wins: a resumed run logs its steps again)."""
    return {row["step"]: row["loss"] for row in map(json.loads, (run / "log.jsonl").read_text().splitlines())}


def _steps_logged(run: Path) -> int:
    """Steps whose log line is complete (the tiny recipe logs every step)."""
    log = run / "log.jsonl"
    return log.read_text().count("\n") if log.exists() else 0


def _train_command(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tessera.cli", "train", "--config", str(recipe), f"out={out}", *extra]


def test_sigkill_then_resume_matches_an_uninterrupted_run_step_for_step(setup):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, killed = setup["root"] / "whole", setup["root"] / "killed"
    subprocess.run(_train_command(setup["recipe"], whole), env=env, check=True, capture_output=True)
    proc = subprocess.Popen(_train_command(setup["recipe"], killed), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # A random step between the first checkpoint (8) and the last (40), then a random moment inside
    # the next step (a checkpoint write included). A random wall-clock delay instead could outlast the
    # run on a fast machine and kill it after its final checkpoint.
    kill_after = random.randint(9, 34)
    while _steps_logged(killed) < kill_after:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.002)
    time.sleep(random.uniform(0.0, 0.02))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = int((killed / "checkpoints" / "latest").read_text().split("-")[1])
    assert 8 <= resumed_from < 40
    subprocess.run(_train_command(setup["recipe"], killed, "--resume"), env=env, check=True, capture_output=True)
    expected, got = _losses(whole), _losses(killed)
    assert sorted(got) == sorted(expected) == list(range(1, 41))
    for step in range(1, 41):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step} (resumed from {resumed_from})"
    assert json.loads((killed / "metrics.json").read_text())["step"] == 40


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(setup, tmp_path, monkeypatch):
    recipe = Recipe.from_file(setup["recipe"]).with_overrides([f"out={tmp_path / 'run'}", "train.steps=16"])
    real_save = torch.save

    def crash_on_the_second(obj, path, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 16:
            Path(path).write_bytes(b"half")  # a torn write, then the process dies
            raise KeyboardInterrupt("killed while writing")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(state_module.torch, "save", crash_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, progress=False)
    monkeypatch.setattr(state_module.torch, "save", real_save)
    assert resolve_checkpoint(tmp_path / "run").name == "step-0000008"
    assert train(recipe, resume=True, progress=False)["step"] == 16


def test_non_finite_steps_are_skipped_then_training_stops(setup, tmp_path, monkeypatch):
    real_loss = MaskGITGenerator.loss
    bad_steps: set[int] = {3}

    def sometimes_nan(self, batch):
        loss, logs = real_loss(self, batch)
        return (loss * float("nan"), logs) if batch["step"] in bad_steps else (loss, logs)

    monkeypatch.setattr(MaskGITGenerator, "loss", sometimes_nan)
    recipe = Recipe.from_file(setup["recipe"]).with_overrides([f"out={tmp_path / 'a'}", "train.steps=6",
                                                               "train.max_bad_steps=2"])
    with pytest.warns(RuntimeWarning, match="skipped the update"):
        metrics = train(recipe, progress=False)
    assert metrics["step"] == 6 and all(v == v for v in _losses(tmp_path / "a").values())  # no NaN logged
    bad_steps.update({4, 5})
    with pytest.raises(FloatingPointError, match="2 steps in a row"):
        train(recipe.with_overrides([f"out={tmp_path / 'b'}"]), progress=False)


def test_epochs_cover_every_sample_once_and_resume_mid_epoch(setup):
    """One epoch of the infinite stream holds each sample once; a StreamStart continues it exactly."""
    shards = str(setup["shards"])
    loader = iter(make_image_loader(shards, 6, 32, shuffle_buffer=8, seed=3))
    batches = [next(loader) for _ in range(20)]
    keys = [m["index"] if "index" in m else json.dumps(m, sort_keys=True) for b in batches for m in b["meta"]]
    epochs = [b["position"][1] for b in batches]
    assert epochs[:10] == [0] * 10 and epochs[10] == 1  # 60 samples = 10 batches per epoch
    assert len(set(keys[:60])) == 60 and sorted(keys[:60], key=str) == sorted(keys[60:120], key=str)
    slot, epoch, emitted = batches[6]["position"]
    resumed = iter(make_image_loader(shards, 6, 32, shuffle_buffer=8, seed=3,
                                     start=StreamStart(1, {slot: (epoch, emitted)})))
    for expected in batches[7:14]:
        got = next(resumed)
        assert torch.equal(got["image"], expected["image"]) and got["position"] == expected["position"]
    assert sorted(slot_shards(list("abcd"), 0, 5, 0, 2) + slot_shards(list("abcd"), 0, 5, 1, 2)) == list("abcd")


def test_an_error_inside_the_loop_ends_the_process_with_loader_workers_running(tmp_path):
    """An exception raised mid-training (here: too many NaN steps) exits the process instead of leaving
    it waiting on the data loader's worker processes."""
    recipe = tiny_recipe(tmp_path, "next_token", images=24, data={"num_workers": 2}, train={"steps": 20})
    (tmp_path / "recipe.yaml").write_text(recipe.to_yaml())
    command = [sys.executable, str(Path(__file__).parent / "tiny_runs.py"), "0,1,2", "train",
               "--config", str(tmp_path / "recipe.yaml"), "train.max_bad_steps=2"]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "2 steps in a row" in done.stderr
