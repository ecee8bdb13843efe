"""The main job end to end (tiny scale), resume, and the CLI's one-line errors on bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tessera.cli import main
from tessera.train.recipe import Recipe
from tessera.train.trainer import train


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qs")
    assert main(["quickstart", "--out", str(out), "--scale", "0.03"]) == 0
    return out


def test_quickstart_writes_every_artifact(quickstart_dir):
    metrics = json.loads((quickstart_dir / "metrics.json").read_text())
    assert metrics["vq"]["psnr_db"] > 5 and 0 < metrics["vq"]["codebook_usage"] <= 1
    assert metrics["next_token"]["final_train_loss"] > 0
    for name in ("samples.png", "reconstructions.png", "README.txt", "recipe_vq.yaml", "recipe_next_token.yaml"):
        assert (quickstart_dir / name).is_file(), name
    grid = Image.open(quickstart_dir / "samples.png")
    assert grid.size[0] > 8 * 32 and grid.size[1] > 2 * 32
    assert (quickstart_dir / "next_token" / "checkpoints" / "latest").is_file()
    assert any((quickstart_dir / "next_token" / "samples").glob("step-*.png"))


def test_sample_cli_writes_a_grid(quickstart_dir, tmp_path):
    out = tmp_path / "grid.png"
    code = main(["sample", "--ckpt", str(quickstart_dir / "next_token"), "--prompt", "two red circles",
                 "--n", "4", "--cfg", "3", "--top-k", "100", "--seed", "0", "--out", str(out)])
    assert code == 0
    assert Image.open(out).size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)


def test_resume_continues_from_the_latest_checkpoint(quickstart_dir, tmp_path):
    recipe = Recipe.from_file(quickstart_dir / "recipe_vq.yaml").with_overrides(
        [f"out={tmp_path / 'run'}", "train.steps=4", "train.ckpt_every=2", "train.sample_every=0"])
    train(recipe, progress=False)
    with pytest.raises(Exception, match="--resume"):
        train(recipe, progress=False)
    longer = recipe.with_overrides(["train.steps=6"])
    metrics = train(longer, resume=True, progress=False)
    assert metrics["step"] == 6
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logged[-1] == 6 and logged == sorted(logged)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-0000006"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tessera.cli", *args], capture_output=True, text=True)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_inputs_give_one_clear_line(quickstart_dir, tmp_path):
    assert_one_line_error(run_cli("sample", "--ckpt", str(quickstart_dir / "next_token"), "--top-p", "1.5"),
                          "top_p=1.5", "(0, 1]")
    assert_one_line_error(run_cli("sample", "--ckpt", str(quickstart_dir / "vq")), "'vq'", "generator")
    assert_one_line_error(run_cli("sample", "--ckpt", str(tmp_path / "nope")), "not found")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {kind: vq, preset: tiny}\ntrain: {stepz: 3}\ndata: {shards: x}\n")
    assert_one_line_error(run_cli("train", "--config", str(recipe)), "stepz", "valid keys")
    recipe.write_text(f"model: {{kind: vq, preset: tiny}}\ndata: {{shards: {tmp_path / 'empty'}}}\nout: {tmp_path / 'o'}\n")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("train", "--config", str(recipe)), "empty")


def test_existing_checkpoint_is_never_damaged(quickstart_dir, tmp_path):
    """A failed overwrite attempt leaves the previous checkpoint loadable and byte-identical."""
    from tessera.checkpoint import resolve_checkpoint
    from tessera.modeling import TesseraModel
    ckpt = resolve_checkpoint(quickstart_dir / "vq")
    before = (ckpt / "model.safetensors").read_bytes()
    model = TesseraModel.from_pretrained(ckpt)
    model.trainable_state_dict = lambda: {"x": torch.zeros(1)}  # saving now fails midway (bad state)
    model.write_into = lambda folder, **kw: (_ for _ in ()).throw(RuntimeError("disk full"))
    with pytest.raises(RuntimeError):
        model.save_pretrained(ckpt)
    assert (ckpt / "model.safetensors").read_bytes() == before
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")]


def test_sigterm_stops_after_the_step_with_a_checkpoint(quickstart_dir, tmp_path, monkeypatch):
    import os
    import signal

    from tessera.tokenizers.vq import VQTokenizer
    recipe = Recipe.from_file(quickstart_dir / "recipe_vq.yaml").with_overrides(
        [f"out={tmp_path / 'run'}", "train.steps=50", "train.ckpt_every=100", "train.sample_every=0"])
    calls = []
    forward = VQTokenizer.forward

    def forward_then_signal(self, batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, batch)

    monkeypatch.setattr(VQTokenizer, "forward", forward_then_signal)
    previous = signal.getsignal(signal.SIGTERM)
    metrics = train(recipe, progress=False)
    assert metrics["step"] == 3 and metrics["stopped_by"] == "SIGTERM"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-0000003"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 3
    assert signal.getsignal(signal.SIGTERM) == previous


def test_eval_tokenizer_cli_writes_report_and_grid(quickstart_dir, tmp_path):
    out = tmp_path / "recon.json"
    code = main(["eval", "tokenizer", "--ckpt", str(quickstart_dir / "vq"), "--shards",
                 str(quickstart_dir / "data" / "shapes32"), "--n", "20", "--batch-size", "8", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["images"] == 20 and report["psnr_db"] > 5
    assert 0 < report["codes_used"] <= 20 * 8 * 8 and 1 <= report["code_perplexity"] <= report["codes_used"]
    assert Image.open(out.with_suffix(".png")).size[0] > 0


def test_eval_fid_cli_sweeps_cfg_with_effnet_features(quickstart_dir, tmp_path):
    out = tmp_path / "fd.json"
    args = ["eval", "fid", "--ckpt", str(quickstart_dir / "next_token"), "--ref", str(quickstart_dir / "data" / "shapes32"),
            "--n", "8", "--cfg", "1,3", "--backbone", "effnet", "--device", "cpu", "--batch-size", "8",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    with pytest.warns(UserWarning, match="2048"):
        assert main(args) == 0
    report = json.loads(out.read_text())
    cached = list((tmp_path / "cache").glob("ref-features-*.npz"))
    assert len(cached) == 1  # the reference features, reused by the next call
    stamp = cached[0].stat().st_mtime_ns
    with pytest.warns(UserWarning, match="2048"):
        assert main(args) == 0
    again = json.loads(out.read_text())["rows"]
    assert cached[0].stat().st_mtime_ns == stamp
    assert [r["FD-EffNetLite0"] for r in again] == [r["FD-EffNetLite0"] for r in report["rows"]]
    assert report["metric"] == "FD-EffNetLite0" and report["features"].startswith("FD-EffNetLite0@")
    assert [r["cfg"] for r in report["rows"]] == [1.0, 3.0]
    for row in report["rows"]:
        assert row["FD-EffNetLite0"] > 0 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert "inception_score" not in row  # IS only with the Inception network
    assert Image.open(out.with_suffix(".png")).size == (640, 360)
    assert Image.open(tmp_path / "fd_samples.png").size[0] > 0
    env = {k: v for k, v in os.environ.items() if k != "TESSERA_INCEPTION_WEIGHTS"}
    proc = subprocess.run([sys.executable, "-m", "tessera.cli", "eval", "fid", "--ckpt", str(quickstart_dir / "next_token"),
                           "--ref", str(quickstart_dir / "data" / "shapes32"), "--n", "4", "--backbone", "inception",
                           "--device", "cpu"], capture_output=True, text=True, env=env)
    assert_one_line_error(proc, "Inception")


def test_classifier_fd_from_a_trained_shape_classifier(quickstart_dir, tmp_path):
    clf = tmp_path / "clf"
    shards = str(quickstart_dir / "data" / "shapes32")
    assert main(["eval", "train-classifier", "--shards", shards, "--label", "shape", "--name", "FD-shapes-classifier",
                 "--n", "64", "--epochs", "2", "--out", str(clf)]) == 0
    out = tmp_path / "fd.json"
    with pytest.warns(UserWarning, match="2048"):
        assert main(["eval", "fid", "--ckpt", str(quickstart_dir / "next_token"), "--ref", shards, "--n", "6",
                     "--backbone", f"classifier:{clf}", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["metric"] == "FD-shapes-classifier" and report["rows"][0]["FD-shapes-classifier"] >= 0
    assert main(["eval", "train-classifier", "--shards", shards, "--name", "x", "--out", str(tmp_path / "c2")]) == 2


def test_eval_compositional_cli_scores_every_task(quickstart_dir, tmp_path):
    out = tmp_path / "comp.json"
    code = main(["eval", "compositional", "--ckpt", str(quickstart_dir / "next_token"), "--per-prompt", "2",
                 "--limit", "2", "--device", "cpu", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    tags = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    assert list(report["tasks"]) == tags and report["prompts"] == 12 and len(report["images"]) == 24
    assert report["overall"] == pytest.approx(sum(report["tasks"].values()) / 6)
    assert all(0 <= acc <= 1 for acc in report["tasks"].values())
    assert all(isinstance(r["correct"], bool) and r["reason"] is not None for r in report["images"])
    assert Image.open(out.with_suffix(".png")).size == (640, 360)
    assert Image.open(tmp_path / "comp_samples.png").size[0] > 0
    assert main(["eval", "compositional", "--ckpt", str(quickstart_dir / "vq"), "--device", "cpu"]) == 2


def test_sigterm_to_the_process_group_with_loader_workers_ends_cleanly(quickstart_dir, tmp_path):
    """What `timeout` or a cluster scheduler does: SIGTERM to every process, DataLoader workers included."""
    import os
    import signal
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tessera.cli", "train", "--config", str(quickstart_dir / "recipe_vq.yaml"),
         f"out={run}", "train.steps=100000", "train.log_every=1", "train.sample_every=0", "data.num_workers=2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (run / "log.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["stopped_by"] == "SIGTERM" and metrics["step"] >= 1
    assert (run / "checkpoints" / "latest").read_text() == f"step-{metrics['step']:07d}"
