"""Captioned audio shards from tiny fake Debian package trees, the audio loader, and bad data."""
import argparse
import functools
import gzip
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tessera.config import ConfigError
from tessera.data import commands, sources
from tessera.data.audio_loader import decode_audio_sample, make_audio_loader
from tessera.data.audio_sources import (GM_FAMILIES, GM_PROGRAMS, SOUNDFONT, AudioPaths, encode_flac,
                                        instrument_clips, instrument_plan, midi_file, note_name, write_audio_dataset)
from tessera.data.shards import CorruptDataWarning, DatasetInfo, DatasetWriter, list_shards, read_info
from tessera.data.sources import SourceError

RATE = 16000
ALL_PACKAGES = ("asterisk-core-sounds-en-wav asterisk-core-sounds-en tuxpaint-stamps-default fluidsynth "
                "fluid-soundfont-gm")


def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    """0.2 s of silence, a 440 Hz tone of `seconds`, 0.2 s of silence."""
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(round(seconds * rate)) / rate)
    audio = np.concatenate([np.zeros(round(0.2 * rate)), tone, np.zeros(round(0.2 * rate))]).astype(np.float32)
    return np.repeat(audio[:, None], channels, axis=1)


def _fake_asterisk(root: Path) -> dict[str, Path]:
    sounds = root / "en_US_f_Allison"
    (sounds / "digits").mkdir(parents=True)
    for name, seconds in (("hello", 0.5), ("digits/1", 0.3), ("beep", 0.2)):
        sf.write(sounds / f"{name}.wav", _tone(seconds, 8000), 8000, subtype="PCM_16")
    (sounds / "broken.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    transcripts = root / "core-sounds-en.txt.gz"
    with gzip.open(transcripts, "wt") as f:
        f.write("; Core Asterisk Sounds in English\n\nhello: Hello world.\ndigits/1: one\n"
                "beep: [a simple beep tone]\ngone: Not on disk.\nbroken: Broken.\n")
    return {"transcripts": transcripts, "sounds": sounds}


def _fake_tuxpaint(root: Path) -> Path:
    stamps = root / "stamps"
    (stamps / "animals" / "cats").mkdir(parents=True)
    (stamps / "food").mkdir()
    (stamps / "animals" / "cats" / "cat.txt").write_text("A cat.\nfr.utf8=Un chat.\nes.utf8=Un gato.\n")
    for language in ("", "_fr", "_de"):  # no German sentence in cat.txt
        sf.write(stamps / "animals" / "cats" / f"cat_desc{language}.ogg", _tone(0.4, 44100, 2), 44100,
                 format="OGG", subtype="VORBIS")
    sf.write(stamps / "food" / "apple_desc_es.ogg", _tone(0.3, 44100), 44100, format="OGG", subtype="VORBIS")
    return stamps


@pytest.fixture()
def paths(tmp_path) -> AudioPaths:
    return AudioPaths(**_fake_asterisk(tmp_path / "asterisk"), stamps=_fake_tuxpaint(tmp_path / "tuxpaint"))


def _samples(folder: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in list_shards(folder):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_speech_and_tuxpaint_to_shards(paths, tmp_path):
    info = write_audio_dataset(tmp_path / "out", RATE, ("speech_en", "tuxpaint"), per_shard=2, paths=paths,
                               progress=False)
    assert info["sources"]["speech_en"] == {"found": 5, "written": 3,
                                            "skipped": {"no wav file": 1, "unreadable audio": 1},
                                            "seconds": pytest.approx(1.6, abs=0.1)}
    assert info["sources"]["tuxpaint"]["found"] == 4 and info["sources"]["tuxpaint"]["written"] == 2
    assert info["sources"]["tuxpaint"]["skipped"] == {"no sentence in that language": 1, "no caption file": 1}
    stored = read_info(tmp_path / "out")
    assert stored["count"] == 5 and stored["sample_rate"] == RATE and stored["keys"] == ["flac", "json", "txt"]
    assert len(stored["shards"]) == 3 and "CC-BY-SA-3.0" in stored["license"] and "GPL-2" in stored["license"]

    samples = _samples(tmp_path / "out")
    captions = {key: s["txt"].decode() for key, s in samples.items()}
    assert captions == {"speech_en-hello": "speech, English: Hello world.",
                        "speech_en-digits_1": "speech, English: one", "speech_en-beep": "sound: a simple beep tone",
                        "tuxpaint-animals_cats-cat-en": "speech, English: A cat.",
                        "tuxpaint-animals_cats-cat-fr": "speech, French: Un chat."}
    for key, tone in (("speech_en-hello", 0.5), ("speech_en-beep", 0.2), ("tuxpaint-animals_cats-cat-fr", 0.4)):
        audio, rate = sf.read(io.BytesIO(samples[key]["flac"]))
        meta = json.loads(samples[key]["json"])
        assert rate == RATE and audio.ndim == 1 and sf.info(io.BytesIO(samples[key]["flac"])).subtype == "PCM_16"
        assert abs(len(audio) - (tone + 0.2) * RATE) < 0.03 * RATE, "silence trimmed to 0.1 s at each end"
        assert meta["duration"] == pytest.approx(len(audio) / RATE, abs=1e-3)
        assert 0.45 < np.abs(audio).max() < 0.55
    hello = json.loads(samples["speech_en-hello"]["json"])
    assert hello == {"source": "asterisk-core-sounds-en", "kind": "speech", "language": "en",
                     "speaker": "Allison Smith", "name": "hello", "transcript": "Hello world.",
                     "original_rate": 8000, "duration": hello["duration"]}
    cat = json.loads(samples["tuxpaint-animals_cats-cat-fr"]["json"])
    assert cat["language"] == "fr" and cat["text"] == "Un chat." and cat["stamp"] == "cat"
    assert cat["category"] == "animals" and cat["original_rate"] == 44100


def test_max_seconds_and_24k(paths, tmp_path):
    info = write_audio_dataset(tmp_path / "out", 24000, ("speech_en",), max_seconds=1.0, paths=paths,
                               progress=False)
    assert info["sample_rate"] == 24000
    for s in _samples(tmp_path / "out").values():
        audio, rate = sf.read(io.BytesIO(s["flac"]))
        assert rate == 24000 and len(audio) <= 24000


def test_loader_batches(paths, tmp_path):
    write_audio_dataset(tmp_path / "out", RATE, ("speech_en", "tuxpaint"), paths=paths, progress=False)
    batches = list(make_audio_loader(str(tmp_path / "out"), 2, RATE, 0.5, infinite=False, shuffle_buffer=0))
    assert [len(b["text"]) for b in batches] == [2, 2, 1]
    for batch in batches:
        assert batch["audio"].shape == (len(batch["text"]), 1, 8000) and batch["audio"].dtype == torch.float32
        assert batch["lengths"].dtype == torch.int64 and batch["audio"].abs().max() <= 1
        for audio, length in zip(batch["audio"][:, 0], batch["lengths"].tolist(), strict=True):
            assert 0 < length <= 8000 and not audio[length:].any() and audio[:length].abs().max() > 0.4
    lengths = {c: n for b in batches for c, n in zip(b["text"], b["lengths"].tolist(), strict=True)}
    assert lengths["speech, English: Hello world."] == 8000, "0.7 s clip cropped to 0.5 s"
    assert lengths["sound: a simple beep tone"] < 8000, "0.4 s clip zero-padded"
    first = [next(iter(make_audio_loader(str(tmp_path / "out"), 3, RATE, 0.25, seed=4)))["audio"] for _ in range(2)]
    assert torch.equal(*first), "seeded crops and order"


def test_corrupt_and_wrong_rate_flac_are_skipped_and_counted(tmp_path):
    good = encode_flac(_tone(0.3, RATE)[:, 0], RATE)
    with DatasetWriter(tmp_path / "bad", DatasetInfo("bad", "test", "CC0", 0, sample_rate=RATE)) as writer:
        for key, flac in (("good", good), ("corrupt", b"fLaC not really"), ("slow", encode_flac(np.zeros(800), 8000)),
                          ("truncated", good[:60])):
            writer.write_record(key, {"flac": flac, "txt": key.encode(), "json": b"{}"})
    with pytest.raises(ValueError, match="8000 Hz, not 16000 Hz"):
        decode_audio_sample({"__key__": "slow", "flac": encode_flac(np.zeros(800), 8000), "txt": b"", "json": b"{}"},
                            RATE)
    with pytest.warns(CorruptDataWarning) as warned:
        batches = list(make_audio_loader(str(tmp_path / "bad"), 4, RATE, 1.0, infinite=False, shuffle_buffer=0))
    messages = [str(w.message) for w in warned]
    assert "corrupt.flac is not readable audio" in messages[0] and "slow.flac is at 8000 Hz" in messages[1]
    assert "skipped 3 " in messages[-1] and "end of pass" in messages[-1]
    assert [b["text"] for b in batches] == [["good"]]


def test_missing_packages_fail_before_writing(paths, tmp_path):
    nowhere = AudioPaths(transcripts=tmp_path / "no.txt.gz", sounds=tmp_path / "none", stamps=tmp_path / "none",
                         fluidsynth="no-such-fluidsynth", soundfont=tmp_path / "none.sf2")
    with pytest.raises(SourceError) as err:
        write_audio_dataset(tmp_path / "out", paths=nowhere, progress=False)
    message = str(err.value)
    assert "\n" not in message and f"apt-get update && apt-get install -y {ALL_PACKAGES}" in message
    assert "speech_en (no " in message and "instruments (no `no-such-fluidsynth` program on PATH)" in message
    half = AudioPaths(transcripts=paths.transcripts, sounds=paths.sounds, stamps=tmp_path / "none")
    with pytest.raises(SourceError, match=r"tuxpaint \(no .*none\); install with: apt-get update && "
                                          r"apt-get install -y tuxpaint-stamps-default   \(or add --install\)$"):
        write_audio_dataset(tmp_path / "out", sources=("speech_en", "tuxpaint"), paths=half, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="unknown audio source"):
        write_audio_dataset(tmp_path / "out", sources=("speech_en", "podcasts"), paths=paths, progress=False)


def test_install_runs_apt(tmp_path, monkeypatch):
    calls = []

    def run(command, cwd=None):
        calls.append(command)
        if "install" in command:
            _fake_tuxpaint(tmp_path / "later")
        return subprocess.CompletedProcess(command, 0)
    monkeypatch.setattr(sources.subprocess, "run", run)
    monkeypatch.setattr(sources.shutil, "which", lambda name: f"/usr/bin/{name}")
    later = AudioPaths(stamps=tmp_path / "later" / "stamps")
    assert write_audio_dataset(tmp_path / "out", sources=("tuxpaint",), install=True, paths=later,
                               progress=False)["count"] == 2
    assert calls == [["apt-get", "update"], ["apt-get", "install", "-y", "tuxpaint-stamps-default"]]


def test_cli_prints_the_per_source_report(paths, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(commands, "write_audio_dataset", functools.partial(write_audio_dataset, paths=paths,
                                                                           progress=False))
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "audio", "--out", str(tmp_path / "out"), "--sources", "speech_en,tuxpaint",
                              "--rate", "24000", "--per-shard", "3"])
    args.func(args)
    out = capsys.readouterr().out
    assert "speech_en: found 5, wrote 3" in out and "skipped 2 (1 no wav file, 1 unreadable audio)" in out
    assert "tuxpaint: found 4, wrote 2" in out and "wrote 5 clips" in out and "in 2 shard(s)" in out


def test_midi_file_bytes():
    midi = midi_file([(960, bytes([0x80, 60, 0])), (0, bytes([0xC0, 5])), (0, bytes([0x90, 60, 100]))])
    assert midi[:14] == b"MThd\x00\x00\x00\x06\x00\x00\x00\x01\x01\xe0"  # format 0, one track, 480 ticks/beat
    assert midi[14:18] == b"MTrk" and int.from_bytes(midi[18:22], "big") == len(midi) - 22
    assert midi[22:29] == b"\x00\xff\x51\x03\x07\xa1\x20"  # tempo 500000 us per beat
    assert midi[29:] == b"\x00\xc0\x05\x00\x90\x3c\x64\x87\x40\x80\x3c\x00\x00\xff\x2f\x00"  # 960 = VLQ 87 40


def test_instrument_plan():
    plans = instrument_plan(300, seed=3)
    assert plans[:50] == instrument_plan(50, seed=3) and plans != instrument_plan(300, seed=4)
    assert {p["program"] for p in plans[:128]} == set(range(128)) and len(GM_PROGRAMS) == 128 == 8 * len(GM_FAMILIES)
    kinds = [p["meta"]["kind"] for p in plans]
    assert 0.15 < kinds.count("melody") / len(plans) < 0.35
    assert note_name(60) == "C4" and note_name(69) == "A4" and note_name(21) == "A0"
    for p in plans:
        meta = p["meta"]
        assert meta["instrument"] == GM_PROGRAMS[p["program"]] and meta["family"] == GM_FAMILIES[p["program"] // 8]
        assert p["caption"].startswith(f"instrument {meta['kind']}, {meta['instrument']}, {meta['family']} family: ")
        assert f"velocity {meta['velocity']}" in p["caption"] and p["length"] <= 10.0 + 1.0
        if meta["kind"] == "melody":
            assert f"at {meta['tempo']} BPM" in p["caption"] and len(meta["pitch"]) == len(p["notes"]) >= 2
        else:
            assert p["caption"].split(": ")[1].startswith(meta["note"]) and p["notes"][0][2] == meta["pitch"]


@pytest.mark.skipif(not (shutil.which("fluidsynth") and SOUNDFONT.is_file()),
                    reason="needs the fluidsynth and fluid-soundfont-gm Debian packages")
def test_fluidsynth_renders_two_notes():
    source = instrument_clips(RATE, 2, seed=0)
    clips = list(source.clips)
    assert source.found == 2 and len(clips) + source.skipped.total() == 2 and clips
    plans = {plan["key"]: plan for plan in instrument_plan(2, seed=0)}
    for clip in clips:
        plan = plans[clip.key]
        assert clip.caption == plan["caption"] and clip.audio.dtype == np.float32
        assert 0.2 < len(clip.audio) / RATE <= plan["length"] + 0.01 and 0.001 < np.abs(clip.audio).max() <= 1
        assert clip.meta["duration"] == pytest.approx(len(clip.audio) / RATE, abs=1e-3)


def test_fluidsynth_failure_is_a_clear_error(tmp_path):
    fake = tmp_path / "fluidsynth"
    fake.write_text("#!/bin/sh\necho 'cannot load soundfont' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(SourceError, match=r"fluidsynth failed \(exit 3\): cannot load soundfont"):
        list(instrument_clips(RATE, 2, fluidsynth=str(fake), soundfont=tmp_path / "x.sf2").clips)
