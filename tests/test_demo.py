"""The Gradio demo: previews, the `/generate` API (images and audio), clear messages for bad input,
8 concurrent clients under the queue's limit, and the `demo` / `setup` commands' one-line errors.

The app runs as `tessera demo` in a subprocess on a free loopback port over tiny CPU-trained
checkpoints (the browser tests in test_demo_browser.py reuse these helpers)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

QUICK = {"steps": 2, "batch_size": 2, "log_every": 1, "ckpt_every": 2, "sample_every": 0, "warmup_steps": 1}
IMAGE_SIZE = 32
CONCURRENCY = 2
TIMING = re.compile(r"^generated in \d+\.\d\d s \(")


def build_tiny_models(folder: Path, audio_shards: Path) -> dict[str, Path]:
    """Tiny text-conditional generators trained for 2 steps (next-token, MaskGIT, VAR on 32px
    shapes; MAGNeT on tones), built once under `folder`: name -> run folder."""
    from tessera.data.shapes import write_shapes_dataset
    from tessera.train.recipe import Recipe
    from tessera.train.trainer import train

    runs = {name: folder / name for name in ("next_token", "maskgit", "var", "magnet")}
    if (folder / "done").exists():
        return runs
    shapes = folder / "shapes"
    write_shapes_dataset(shapes, n=8, resolution=IMAGE_SIZE, seed=0)

    def fit(kind: str, out: str, shards: Path = shapes, **config) -> None:
        torch.manual_seed(0)
        data = {"shards": str(shards), **({"resolution": IMAGE_SIZE} if shards == shapes else {})}
        train(Recipe.from_dict({"model": {"kind": kind, "preset": "tiny", "config": config}, "data": data,
                                "train": QUICK, "out": str(folder / out)}), progress=False)

    text = {"cond": "text", "text_tokenizer": "auto"}
    fit("vq", "vq")
    fit("next_token", "next_token", tokenizer=str(folder / "vq"), image_size=IMAGE_SIZE, **text)
    fit("maskgit", "maskgit", tokenizer=str(folder / "vq"), image_size=IMAGE_SIZE, **text)
    fit("multiscale_vq", "msvq")
    fit("next_scale", "var", tokenizer=str(folder / "msvq"), **text)
    fit("audio_codec", "codec", audio_shards, clip_seconds=0.1)
    fit("magnet", "magnet", audio_shards, tokenizer=str(folder / "codec"), clip_seconds=0.1, **text)
    (folder / "done").touch()
    return runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_demo(models: list[Path], concurrency: int, folder: Path) -> Iterator[str]:
    """`tessera demo` over `models` on a free loopback port; yields its URL, stops it afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "tessera.cli", "demo", "--port", str(port), "--concurrency", str(concurrency),
               "--device", "cpu"]
    for path in models:
        command += ["--ckpt", str(path)]
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(folder / "gradio")}
    url = f"http://127.0.0.1:{port}"
    with open(folder / "demo.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the demo exited ({proc.returncode}): {(folder / 'demo.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the demo did not answer at {url} within 120 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, audio_shards) -> dict[str, Path]:
    return build_tiny_models(tmp_path_factory.getbasetemp() / "demo_models", audio_shards)


@pytest.fixture(scope="module")
def demo_url(tiny_models, tmp_path_factory) -> Iterator[str]:
    with running_demo(list(tiny_models.values()), CONCURRENCY, tmp_path_factory.mktemp("demo_app")) as url:
        yield url


def client(url: str):
    from gradio_client import Client
    return Client(url, verbose=False)


def request(model: str, prompt: str = "a red circle", cfg: float = 2.0, temperature: float = 1.0, top_k: int = 0,
            top_p: float = 1.0, steps: int = 4, seed: int = 0, duration: float | None = None) -> tuple:
    """The `/generate` inputs, in the page's order."""
    return model, prompt, cfg, temperature, top_k, top_p, steps, seed, duration


def stats(url: str) -> dict[str, int]:
    return client(url).predict(api_name="/stats")


def test_previews_come_step_by_step_and_leave_the_result_unchanged(tiny_models):
    from tessera.demo.progress import Finished, stream_sample
    from tessera.sample import generate, load_generator, resolve_settings, sampler_for
    expected = {"next_token": ("row", 8), "maskgit": ("step", 5), "var": ("scale", 4), "magnet": ("step", 5 + 3 * 2)}
    for name, (what, total) in expected.items():
        model = load_generator(tiny_models[name], device="cpu")
        masked = {"stage_steps": [5, 2, 2, 2]} if name == "magnet" else {"steps": 5}
        settings, masked = resolve_settings(model, {"cfg": 2.0, "seed": 3}, masked)
        events = list(stream_sample(model, model.parse_condition(["a red circle"], 1),
                                    sampler_for(model, settings, masked=masked)))
        *steps, last = events
        assert [(e.what, e.done, e.total) for e in steps] == [(what, i + 1, total) for i in range(total)], name
        pictures = [e.image for e in steps]
        if model.modality == "image":
            assert all(p is not None and p.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) for p in pictures)
            assert not torch.equal(pictures[0], pictures[-1])  # the picture changes as tokens come in
        else:
            assert pictures == [None] * total
        assert isinstance(last, Finished) and last.seconds > 0
        assert torch.equal(last.output, generate(model, ["a red circle"], 1, settings, masked=masked)), name


def test_closing_the_stream_stops_the_sampler_at_its_next_row(tiny_models):
    from tessera.demo.progress import stream_sample
    from tessera.sample import load_generator, resolve_settings, sampler_for
    model = load_generator(tiny_models["next_token"], device="cpu")
    settings, _ = resolve_settings(model, {})
    sampler = sampler_for(model, settings)
    stream = stream_sample(model, model.parse_condition(["a red circle"], 1), sampler)
    assert next(stream).done == 1
    stream.close()  # what Gradio does when the page goes away
    hook, seen = sampler.on_unit, []
    sampler.on_unit = lambda j, units: (seen.append(j), hook(j, units))
    deadline = time.monotonic() + 10
    while any(t.name == "tessera-sample" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "tessera-sample" for t in threading.enumerate())
    assert all(j < 24 for j in seen)  # stopped within a row of the close, not after all 8 rows


def test_api_streams_previews_then_an_image_and_keeps_a_gallery(demo_url, tiny_models):
    from tessera.images import to_uint8
    from tessera.sample import generate, load_generator, resolve_settings
    session = client(demo_url)
    previews = {"maskgit": ["step 1/4", "step 2/4", "step 3/4", "step 4/4"],
                "next_token": [f"row {i}/8" for i in range(1, 9)], "var": [f"scale {i}/4" for i in range(1, 5)]}
    pictures = {}
    for n, (name, statuses) in enumerate(previews.items(), 1):
        job = session.submit(*request(name, seed=7), api_name="/generate")
        image, audio, gallery, status = job.result(timeout=120)
        assert [out[-1] for out in job.outputs()[:-1]] == statuses
        assert TIMING.match(status) and f"({name}, seed 7)" in status
        assert audio is None
        pictures[name] = np.asarray(Image.open(image).convert("RGB"))
        assert pictures[name].shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and pictures[name].std() > 0
        assert len(gallery) == n and gallery[0]["caption"] == f"{name}: a red circle (seed 7)"
    model = load_generator(tiny_models["var"], device="cpu")  # the page's image is the CLI's, pixel for pixel
    settings, masked = resolve_settings(model, {"cfg": 2.0, "seed": 7})
    assert np.array_equal(pictures["var"], to_uint8(generate(model, ["a red circle"], 1, settings, masked=masked))[0])


def test_api_returns_audio_for_audio_models(demo_url):
    job = client(demo_url).submit(*request("magnet", prompt="note 440 Hz", steps=4, duration=0.1),
                                  api_name="/generate")
    image, audio, _, status = job.result(timeout=120)
    assert image is None and TIMING.match(status)
    assert [out[-1] for out in job.outputs()[:-1]] == [f"step {i}/10" for i in range(1, 11)]  # 4 + 3 streams * 2
    wave, rate = soundfile.read(audio)
    assert rate == 16000 and wave.shape == (1600,) and np.abs(wave).max() > 0
    image, audio, _, status = client(demo_url).predict(*request("magnet", prompt="note 440 Hz", steps=4,
                                                                duration=0.05), api_name="/generate")
    assert soundfile.read(audio)[0].shape == (800,)  # the duration asked for, not the trained clip


@pytest.mark.parametrize("inputs, message", [
    (request("maskgit", prompt="   "), "Enter a prompt: maskgit is text-conditional"),
    (request("maskgit", steps=0), "steps=0 is out of range [1, 100]"),
    (request("maskgit", steps=101), "steps=101 is out of range [1, 100]"),
    (request("var", top_p=1.5), "top_p=1.5 is out of range (0, 1]"),
    (request("var", top_k=-1), "top_k=-1 is out of range"),
    (request("next_token", temperature=-0.5), "temperature=-0.5 is out of range"),
    (request("next_token", cfg=-1.0), "cfg=-1.0 is out of range"),
    (request("next_token", cfg=None), "cfg is empty: enter a number"),
    (request("magnet", duration=5.0), "duration=5.0 is out of range (0.0, 0.1]"),
    (request("magnet", duration=None), "duration is empty: enter seconds of audio"),
])
def test_bad_inputs_give_a_clear_message(demo_url, inputs, message):
    from gradio_client.exceptions import AppError
    before = stats(demo_url)
    with pytest.raises(AppError) as err:
        client(demo_url).predict(*inputs, api_name="/generate")
    assert str(err.value).startswith(message) and "Traceback" not in str(err.value)
    after = stats(demo_url)
    assert after["rejected"] == before["rejected"] + 1 and after["failed"] == before["failed"]


def test_the_page_offers_each_models_own_defaults(tiny_models):
    from tessera.demo.app import DemoModel, masked_steps, model_view
    from tessera.sample import load_generator
    maskgit = load_generator(tiny_models["maskgit"], device="cpu")
    maskgit.recommended_sampling = {"sampling": {"cfg": 4.0, "top_p": 0.8, "top_k": 9}, "masked": {"steps": 7}}
    view = model_view(DemoModel("maskgit", maskgit, "MaskGIT", "a red circle"))
    assert view["cfg"] == {"value": 4.0} and view["top_p"] == {"value": 0.8} and view["top_k"] == {"value": 9}
    assert view["steps"] == {"value": 7, "interactive": True} and view["prompt"]["placeholder"] == "a red circle"
    assert view["image"] == {"visible": True} and view["audio"] == {"visible": False}
    view = model_view(DemoModel("next_token", load_generator(tiny_models["next_token"], device="cpu"), "AR", ""))
    assert view["cfg"] == {"value": 1.0} and view["steps"]["interactive"] is False
    magnet = load_generator(tiny_models["magnet"], device="cpu")
    view = model_view(DemoModel("magnet", magnet, "MAGNeT", ""))
    assert (view["cfg"], view["temperature"], view["steps"]["value"]) == ({"value": 10.0}, {"value": 3.0}, 20)
    assert view["image"] == {"visible": False} and view["audio"] == {"visible": True}
    assert view["duration"] == {"value": magnet.clip_seconds, "visible": True}
    assert masked_steps(magnet, 4) == {"stage_steps": [4, 2, 2, 2]}


def test_class_and_unconditional_models_read_their_condition(tiny_models):
    from tessera.config import ConfigError
    from tessera.demo.app import DemoModel, read_request
    from tessera.registry import build_model
    vq = str(tiny_models["maskgit"].parent / "vq")
    numbers = {"cfg": 2.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "steps": 4, "seed": 0}
    shapes = build_model("maskgit", "tiny", tokenizer=vq, num_classes=3, class_names=["circle", "square", "star"])
    classes = DemoModel("shapes", shapes.eval(), "class-conditional", "")
    with pytest.raises(ConfigError, match=r"^Enter a class: shapes is class-conditional \(name or index: circle, "):
        read_request(classes, " ", **numbers)
    with pytest.raises(ConfigError, match="unknown class 'hexagon'; this model knows: circle, square, star"):
        read_request(classes, "hexagon", **numbers)
    assert read_request(classes, "square", **numbers)[0].tolist() == [1]
    assert read_request(classes, "2", **numbers)[0].tolist() == [2]
    free = DemoModel("free", build_model("maskgit", "tiny", tokenizer=vq, cond="none").eval(), "unconditional", "")
    cond, settings, masked = read_request(free, "a prompt it ignores", **numbers)
    assert cond == 1 and settings.cfg == 2.0 and masked.steps == 4


def test_eight_concurrent_clients_all_finish_within_the_queue_limit(demo_url):
    before = stats(demo_url)

    def call(i: int) -> tuple:
        return client(demo_url).predict(*request("next_token", prompt=f"a red circle {i}", seed=i),
                                        api_name="/generate")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(8)))
    for i, (image, _, _, status) in enumerate(results):
        assert TIMING.match(status) and f"seed {i})" in status
        assert Image.open(image).size == (IMAGE_SIZE, IMAGE_SIZE)
    after = stats(demo_url)
    assert after["served"] == before["served"] + 8 and after["failed"] == before["failed"]
    assert after["running"] == 0 and after["concurrency_limit"] == CONCURRENCY
    assert after["peak_running"] == CONCURRENCY  # the limit was reached and never passed


def one_line_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_demo_command_errors_are_one_line(tiny_models, tmp_path, capsys):
    from tessera.checkpoint import CheckpointError
    from tessera.cli import main
    from tessera.demo.app import build_app
    assert main(["demo", "--ckpt", str(tmp_path / "nope")]) == 2
    assert "checkpoint not found" in one_line_error(capsys)
    assert main(["demo", "--ckpt", str(tiny_models["maskgit"]), "--concurrency", "0"]) == 2
    assert "concurrency=0 is out of range" in one_line_error(capsys)
    with pytest.raises(CheckpointError, match="no generator to show"):
        build_app({})


def test_setup_browser_reports_a_missing_or_failing_apt_get(tmp_path, monkeypatch, capsys):
    from tessera.cli import main
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert main(["setup", "browser"]) == 2 and "apt-get not found" in one_line_error(capsys)
    fake = tmp_path / "bin" / "apt-get"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'E: Could not open lock file' >&2\nexit 100\n")
    fake.chmod(0o755)
    assert main(["setup", "browser"]) == 2
    assert "`apt-get update` failed (exit 100): E: Could not open lock file" in one_line_error(capsys)
