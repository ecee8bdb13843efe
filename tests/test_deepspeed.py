"""The one trainer under DeepSpeed ZeRO (2 CPU processes over gloo). ZeRO-2: it trains, writes a full
model.safetensors for inference and each rank's optimizer partition as safetensors, and a SIGKILLed
launch resumes to repeat the uninterrupted run step for step (with as many processes: others are
refused); a non-finite gradient skips the update.
ZeRO-3, with every parameter sharded: the frozen tokenizer stays whole, the saved weights and EMA are
full tensors, and a resume from a checkpoint repeats the uninterrupted run step for step; a VQ, whose
quantiser reads its codebook outside the embedding's forward, trains."""
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import deepspeed  # noqa: F401 - a dev dependency; the launch below needs it
import psutil  # accelerate's dependency
import pytest
import torch
from safetensors.torch import load_file

from tessera.modeling import TesseraModel
from tessera.registry import build_model
from tessera.train.recipe import Recipe
from tiny_runs import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
ZERO2 = ROOT / "launch" / "accelerate" / "zero2.yaml"
TESSERA = ("-m", "tessera.cli")


def _launch_command(config: Path, recipe: Path, out: Path, *extra: str, program: tuple[str, ...] = TESSERA,
                    processes: int = 2) -> tuple[list[str], dict[str, str]]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
               str(processes), "--main_process_port", "0", *program, "train", "--config", str(recipe), f"out={out}",
               *extra]
    return command, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}"}


def _launch(config: Path, recipe: Path, out: Path, *extra: str, program: tuple[str, ...] = TESSERA,
            processes: int = 2) -> subprocess.CompletedProcess:
    command, env = _launch_command(config, recipe, out, *extra, program=program, processes=processes)
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=400)


def _losses(run: Path) -> dict[int, float]:
    """The loss logged at each step (the last line wins: a resumed run logs its steps again)."""
    return {row["step"]: row["loss"] for row in map(json.loads, (run / "log.jsonl").read_text().splitlines())}


def _assert_same_losses(got: dict[int, float], expected: dict[int, float], resumed_from: int) -> None:
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), \
            f"step {step}, resumed from {resumed_from}"


def test_zero2_trains_saves_and_resumes_like_an_uninterrupted_run(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    tiny = tiny_recipe(tmp_path, train={"steps": 30, "lr": 5e-3, "warmup_steps": 2, "ckpt_every": 4})
    recipe.write_text(tiny.to_yaml())
    whole = _launch(ZERO2, recipe, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert whole.stdout.count("done: step 30") == 1  # printed once per launch, not per rank
    final = tmp_path / "whole" / "checkpoints" / "step-0000030"
    model = TesseraModel.from_pretrained(final)
    assert model.kind == "next_token"  # the full weights, loadable without DeepSpeed
    assert sorted(p.name for p in final.glob("optimizer-*")) == ["optimizer-rank0-of-2.safetensors",
                                                                 "optimizer-rank1-of-2.safetensors"]
    # SIGKILL the whole launch once its first checkpoint exists, then resume it
    command, env = _launch_command(ZERO2, recipe, tmp_path / "killed")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    while not latest.exists():
        assert proc.poll() is None, "the launch ended before its first checkpoint"
        time.sleep(0.05)
    assert proc.poll() is None, "the launch ended before it could be killed"
    # torchrun starts each rank in a session of its own, so killing the launch's process group leaves
    # the ranks training on into the same run folder (racing the resumed launch): kill them as well
    ranks = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for rank in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):  # those in the launch's group are gone already
            rank.kill()
    proc.wait()
    psutil.wait_procs(ranks, timeout=60)
    resumed_from = int(latest.read_text().split("-")[1])
    resumed = _launch(ZERO2, recipe, tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "afresh" not in resumed.stderr  # the optimizer partitions were restored
    _assert_same_losses(_losses(tmp_path / "killed"), _losses(tmp_path / "whole"), resumed_from)
    refused = _launch(ZERO2, recipe, tmp_path / "whole", "--resume", processes=1)
    assert refused.returncode != 0
    assert ("has no optimizer-rank0-of-1.safetensors: its optimizer partitions were saved by 2 processes, "
            "this launch has 1") in refused.stderr


def test_zero2_skips_an_update_whose_gradient_is_not_finite(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe(tmp_path, train={"steps": 3, "ckpt_every": 1, "keep_checkpoints": 3}).to_yaml())
    run = _launch(ZERO2, recipe, tmp_path / "run", program=(str(ROOT / "tests" / "tiny_runs.py"), "1"))  # NaN at step 2
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 2: loss nan, gradient norm not finite: skipped the update" in run.stderr
    before, after = (tmp_path / "run" / "checkpoints" / f"step-000000{n}" for n in (1, 2))
    for name in ("model.safetensors", "ema.safetensors", "optimizer-rank0-of-2.safetensors",
                 "optimizer-rank1-of-2.safetensors"):  # weights, EMA, fp32 masters and Adam moments unchanged
        a, b = load_file(before / name), load_file(after / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert sorted(_losses(tmp_path / "run")) == [1, 3]


def _zero3_config(folder: Path) -> Path:
    """launch/accelerate/zero3.yaml with every parameter sharded (the shipped JSON keeps parameters under
    100k elements whole, which would be all of a tiny model's)."""
    ds = json.loads((ROOT / "launch" / "deepspeed" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (folder / "zero3.json").write_text(json.dumps(ds))
    config = folder / "zero3.yaml"
    config.write_text((ROOT / "launch" / "accelerate" / "zero3.yaml").read_text()
                      .replace("launch/deepspeed/zero3.json", str(folder / "zero3.json")))
    return config


def _roll_back(run: Path, copy: Path, step: int) -> None:
    """Copy a finished run as it stood at checkpoint `step` (later checkpoints and log lines removed)."""
    shutil.copytree(run, copy)
    for ckpt in (copy / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    (copy / "checkpoints" / "latest").write_text(f"step-{step:07d}")
    log = copy / "log.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines() if json.loads(line)["step"] <= step))


def test_zero3_shards_everything_saves_full_weights_and_resumes_exactly(tmp_path):
    config = _zero3_config(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    tiny = tiny_recipe(tmp_path, train={"steps": 8, "lr": 5e-3, "warmup_steps": 2, "ckpt_every": 4})
    tiny = tiny.with_overrides(["model.config.loss_chunk=16"])  # the fused loss reads the head's weight itself
    recipe.write_text(tiny.to_yaml())
    whole = _launch(config, recipe, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    final = tmp_path / "whole" / "checkpoints" / "step-0000008"
    fresh = build_model(tiny.model.kind, tiny.model.preset, **tiny.model.config).trainable_state_dict()
    for name in ("model.safetensors", "ema.safetensors"):  # full tensors, not this rank's shards
        assert {k: v.shape for k, v in load_file(final / name).items()} == {k: v.shape for k, v in fresh.items()}, name
    model = TesseraModel.from_pretrained(final)
    assert model.kind == "next_token" and model.tokenizer is not None
    _roll_back(tmp_path / "whole", tmp_path / "resumed", 4)
    resumed = _launch(config, recipe, tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "afresh" not in resumed.stderr
    _assert_same_losses(_losses(tmp_path / "resumed"), _losses(tmp_path / "whole"), 4)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(final / name), load_file(tmp_path / "resumed" / "checkpoints" / "step-0000008" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    compiled = _launch(config, recipe, tmp_path / "compiled", "train.compile=true", processes=1)
    assert compiled.returncode != 0 and "train.compile=true under DeepSpeed ZeRO-3" in compiled.stderr


def test_zero3_trains_a_vq_whose_codebook_is_read_outside_its_module(tmp_path):
    tiny_recipe(tmp_path)  # the shards
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(Recipe.from_dict({
        "model": {"kind": "vq", "preset": "tiny"},
        "data": {"shards": str(tmp_path / "shards"), "resolution": 32, "shuffle_buffer": 0},
        "train": {"steps": 2, "batch_size": 4, "log_every": 1, "sample_every": 0}}).to_yaml())
    run = _launch(_zero3_config(tmp_path), recipe, tmp_path / "run")
    assert run.returncode == 0, run.stderr[-3000:]
    model = TesseraModel.from_pretrained(tmp_path / "run")
    fresh = build_model("vq", "tiny").trainable_state_dict()
    assert {k: v.shape for k, v in model.trainable_state_dict().items()} == {k: v.shape for k, v in fresh.items()}


def test_zero3_trains_a_next_scale_model_whose_blocks_hand_on_their_mlp_branch(tmp_path):
    """AdaLN blocks return (stream, PendingBranch): ZeRO-3's hooks on every module pass that output on."""
    tiny_recipe(tmp_path)  # the shards
    build_model("multiscale_vq", "tiny").save_pretrained(tmp_path / "msvq")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(Recipe.from_dict({
        "model": {"kind": "next_scale", "preset": "tiny", "config": {"tokenizer": str(tmp_path / "msvq"),
                                                                     "cond": "none", "loss_chunk": 16}},
        "data": {"shards": str(tmp_path / "shards"), "resolution": 32, "shuffle_buffer": 0},
        "train": {"steps": 2, "batch_size": 4, "log_every": 1, "sample_every": 0}}).to_yaml())
    run = _launch(_zero3_config(tmp_path), recipe, tmp_path / "run")
    assert run.returncode == 0, run.stderr[-3000:]
    assert all(math.isfinite(loss) for loss in _losses(tmp_path / "run").values())
    model = TesseraModel.from_pretrained(tmp_path / "run")
    assert model.config.trunk.cond_dim > 0  # the blocks are AdaLN-modulated
    fresh = build_model("next_scale", "tiny", tokenizer=str(tmp_path / "msvq"), cond="none").trainable_state_dict()
    assert {k: v.shape for k, v in model.trainable_state_dict().items()} == {k: v.shape for k, v in fresh.items()}
