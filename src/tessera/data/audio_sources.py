"""Captioned audio from Debian packages to shards: Asterisk English prompts, Tux Paint spoken
stamp descriptions, and General MIDI notes and melodies rendered with FluidSynth.

Each clip is made mono, trimmed of leading and trailing silence (below -50 dBFS, keeping 0.1 s),
cut to `max_seconds`, resampled to one rate and stored as `KEY.flac` (16-bit), `KEY.txt` (the
caption) and `KEY.json` (meta). Captions are "<kind>, <qualifier>: <content>":
  speech_en    "speech, English: <exact transcript>" ("sound: beep tone" for bracketed non-speech)
  tuxpaint     "speech, French: <the stamp's sentence in that language>"
  instruments  "instrument note, Cello, strings family: A3, velocity 75, held 1.0 s" or
               "instrument melody, Cello, strings family: 6 notes in D minor at 120 BPM, velocity 75"
A missing package raises SourceError naming the apt-get command; `install=True` runs it.
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import io
import json
import math
import os
import random
import re
import shlex
import shutil
import struct
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly
from tqdm.auto import tqdm

from ..config import ConfigError, check_range
from .shards import DatasetInfo, DatasetWriter
from .sources import SourceError, _run_install

ASTERISK_TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
ASTERISK_SOUNDS = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
AUDIO_SOURCES = ("speech_en", "tuxpaint", "instruments")
DEFAULT_INSTRUMENTS = 3000
_PACKAGES = {"speech_en": ("asterisk-core-sounds-en-wav", "asterisk-core-sounds-en"),
             "tuxpaint": ("tuxpaint-stamps-default",), "instruments": ("fluidsynth", "fluid-soundfont-gm")}
_LICENSES = {"speech_en": "CC-BY-SA-3.0 (Asterisk core sounds, voice of Allison Smith)",
             "tuxpaint": "GPL-2 (Tux Paint stamps)", "instruments": "MIT (FluidR3_GM soundfont)"}
_SILENCE = 10 ** (-50 / 20)  # peak level below which audio counts as silence
_TRIM_PAD = 0.1  # seconds of silence kept at each end
_CHUNK = 16  # files decoded per thread-pool task
_WORKERS = min(4, os.cpu_count() or 1)

LANGUAGES = {"be": "Belarusian", "bg": "Bulgarian", "ca": "Catalan", "da": "Danish", "de": "German", "el": "Greek",
             "en": "English", "es": "Spanish", "fr": "French", "it": "Italian", "lt": "Lithuanian",
             "ml": "Malayalam", "nl": "Dutch", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian"}
GM_FAMILIES = ("piano", "chromatic percussion", "organ", "guitar", "bass", "strings", "ensemble", "brass", "reed",
               "pipe", "synth lead", "synth pad", "synth effects", "ethnic", "percussive", "sound effects")
GM_PROGRAMS = (
    "Acoustic Grand Piano", "Bright Acoustic Piano", "Electric Grand Piano", "Honky-tonk Piano", "Electric Piano 1",
    "Electric Piano 2", "Harpsichord", "Clavinet", "Celesta", "Glockenspiel", "Music Box", "Vibraphone", "Marimba",
    "Xylophone", "Tubular Bells", "Dulcimer", "Drawbar Organ", "Percussive Organ", "Rock Organ", "Church Organ",
    "Reed Organ", "Accordion", "Harmonica", "Tango Accordion", "Acoustic Guitar (nylon)", "Acoustic Guitar (steel)",
    "Electric Guitar (jazz)", "Electric Guitar (clean)", "Electric Guitar (muted)", "Overdriven Guitar",
    "Distortion Guitar", "Guitar Harmonics", "Acoustic Bass", "Electric Bass (finger)", "Electric Bass (pick)",
    "Fretless Bass", "Slap Bass 1", "Slap Bass 2", "Synth Bass 1", "Synth Bass 2", "Violin", "Viola", "Cello",
    "Contrabass", "Tremolo Strings", "Pizzicato Strings", "Orchestral Harp", "Timpani", "String Ensemble 1",
    "String Ensemble 2", "Synth Strings 1", "Synth Strings 2", "Choir Aahs", "Voice Oohs", "Synth Voice",
    "Orchestra Hit", "Trumpet", "Trombone", "Tuba", "Muted Trumpet", "French Horn", "Brass Section", "Synth Brass 1",
    "Synth Brass 2", "Soprano Sax", "Alto Sax", "Tenor Sax", "Baritone Sax", "Oboe", "English Horn", "Bassoon",
    "Clarinet", "Piccolo", "Flute", "Recorder", "Pan Flute", "Blown Bottle", "Shakuhachi", "Whistle", "Ocarina",
    "Lead 1 (square)", "Lead 2 (sawtooth)", "Lead 3 (calliope)", "Lead 4 (chiff)", "Lead 5 (charang)",
    "Lead 6 (voice)", "Lead 7 (fifths)", "Lead 8 (bass + lead)", "Pad 1 (new age)", "Pad 2 (warm)",
    "Pad 3 (polysynth)", "Pad 4 (choir)", "Pad 5 (bowed)", "Pad 6 (metallic)", "Pad 7 (halo)", "Pad 8 (sweep)",
    "FX 1 (rain)", "FX 2 (soundtrack)", "FX 3 (crystal)", "FX 4 (atmosphere)", "FX 5 (brightness)", "FX 6 (goblins)",
    "FX 7 (echoes)", "FX 8 (sci-fi)", "Sitar", "Banjo", "Shamisen", "Koto", "Kalimba", "Bagpipe", "Fiddle", "Shanai",
    "Tinkle Bell", "Agogo", "Steel Drums", "Woodblock", "Taiko Drum", "Melodic Tom", "Synth Drum", "Reverse Cymbal",
    "Guitar Fret Noise", "Breath Noise", "Seashore", "Bird Tweet", "Telephone Ring", "Helicopter", "Applause",
    "Gunshot")
_FAMILY_PITCHES = ((33, 96), (48, 96), (36, 84), (40, 84), (28, 60), (36, 96), (36, 84), (40, 82), (40, 88),
                   (60, 96), (40, 88), (36, 84), (36, 84), (48, 84), (48, 84), (48, 72))  # MIDI range per family
_PROGRAM_PITCHES = {40: (55, 100), 41: (48, 88), 42: (36, 76), 43: (28, 60), 47: (40, 57), 56: (52, 84),
                    57: (40, 72), 58: (28, 58), 60: (34, 77), 64: (56, 88), 65: (49, 81), 66: (44, 76), 67: (36, 69),
                    68: (58, 91), 69: (52, 81), 70: (34, 75), 71: (50, 91), 72: (74, 102), 73: (60, 96)}  # real ranges
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
VELOCITIES = (25, 50, 75, 100, 127)  # as in NSynth
_SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
_HOLDS = (0.5, 1.0, 2.0)  # seconds a single note is held
_BEATS = (0.5, 0.5, 1.0, 1.0, 1.0, 2.0)  # melody note lengths
_RELEASE = 1.0  # seconds rendered after the last note-off
_GAP = 0.5  # seconds of silence between clips rendered together
_PER_RENDER = 50  # clips per MIDI file
_FLUIDSYNTH_GAIN = 0.8
_TICKS_PER_BEAT = 480
_TICKS_PER_SECOND = 2 * _TICKS_PER_BEAT  # at the MIDI default tempo, 120 BPM


@dataclasses.dataclass(frozen=True)
class AudioPaths:
    """Where the sources' files are (the Debian package locations by default)."""

    transcripts: Path = ASTERISK_TRANSCRIPTS
    sounds: Path = ASTERISK_SOUNDS
    stamps: Path = TUXPAINT_STAMPS
    fluidsynth: str = "fluidsynth"
    soundfont: Path = SOUNDFONT


@dataclasses.dataclass
class AudioClip:
    """One sample: float32 mono `audio` in [-1, 1] at the dataset's rate."""

    key: str
    audio: np.ndarray
    caption: str
    meta: dict[str, Any]


@dataclasses.dataclass
class AudioSource:
    """A source's `found` candidates and its `clips` (lazy); `skipped` counts reasons as they are met."""

    name: str
    found: int
    clips: Iterator[AudioClip]
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    written: int = 0
    seconds: float = 0.0

    def report(self) -> dict[str, Any]:
        skipped = dict(sorted(self.skipped.items(), key=lambda item: (-item[1], item[0])))  # most first
        return {"found": self.found, "written": self.written, "skipped": skipped,
                "seconds": round(self.seconds, 1)}


# ---------------------------------------------------------------------------- audio helpers

def prepare(audio: np.ndarray, rate: int, sample_rate: int, max_seconds: float) -> np.ndarray:
    """float32 mono at `sample_rate` in [-1, 1]: channels averaged, silence trimmed from both ends,
    cut to `max_seconds`, resampled; empty when the input is silent."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    loud = np.flatnonzero(np.abs(audio) > _SILENCE)
    if not len(loud):
        return audio[:0]
    pad = round(_TRIM_PAD * rate)
    audio = audio[max(loud[0] - pad, 0):loud[-1] + pad + 1][:round(max_seconds * rate)]
    if rate != sample_rate:
        g = math.gcd(rate, sample_rate)
        audio = resample_poly(audio, sample_rate // g, rate // g).astype(np.float32)
    return np.clip(audio, -1.0, 1.0)


def encode_flac(audio: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM FLAC file bytes of float mono `audio` in [-1, 1]."""
    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _clip(key: str, audio: np.ndarray, rate: int, sample_rate: int, max_seconds: float, caption: str,
          meta: dict[str, Any]) -> AudioClip | str:
    audio = prepare(audio, rate, sample_rate, max_seconds)
    if not len(audio):
        return "silent"
    meta |= {"original_rate": rate, "duration": round(len(audio) / sample_rate, 3)}
    return AudioClip(re.sub(r"[^A-Za-z0-9_-]", "_", key), audio, caption, meta)


def _read(path: Path) -> tuple[np.ndarray, int] | str:
    try:
        return sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.SoundFileError, OSError):
        return "unreadable audio"


def _prefetch(fn: Callable[[Any], Any], tasks: Iterable[Any], workers: int = _WORKERS) -> Iterator[Any]:
    """fn(task) for each task, in order, run in `workers` threads a few tasks ahead."""
    with ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append(pool.submit(fn, task))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _source(name: str, found: int, tasks: Sequence[Any], load: Callable[[Any], list[AudioClip | str]]) -> AudioSource:
    """An AudioSource whose clips come from `load(task)` (a list of clips and skip reasons) per task."""
    skipped: collections.Counter = collections.Counter()

    def clips() -> Iterator[AudioClip]:
        for results in _prefetch(load, tasks):
            for result in results:
                if isinstance(result, str):
                    skipped[result] += 1
                else:
                    yield result
    return AudioSource(name, found, clips(), skipped)


def _chunked(items: list[Any], load_one: Callable[[Any], AudioClip | str]) -> tuple[list, Callable]:
    return [items[i:i + _CHUNK] for i in range(0, len(items), _CHUNK)], lambda chunk: [load_one(x) for x in chunk]


# ---------------------------------------------------------------------------- speech_en (Asterisk)

def read_transcripts(path: Path) -> list[tuple[str, str]]:
    """(name, text) pairs from the gzipped `name: text` lines (comments start with ';')."""
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        pairs = [line.strip().split(": ", 1) for line in lines if line.strip() and not line.startswith(";")]
    bad = [p[0] for p in pairs if len(p) != 2]
    if bad:
        raise SourceError(f"{path}: line {bad[0]!r} is not `name: text`")
    return [(name, text.strip()) for name, text in pairs]


def speech_en_clips(sample_rate: int, *, transcripts: Path = ASTERISK_TRANSCRIPTS, sounds: Path = ASTERISK_SOUNDS,
                    max_seconds: float = 10.0, seed: int = 0) -> AudioSource:
    """Asterisk's English prompts (8 kHz wav) captioned "speech, English: <exact transcript>";
    prompts whose transcript is wholly bracketed ("[beep tone]") are "sound: beep tone"."""
    pairs = read_transcripts(Path(transcripts))
    random.Random(seed).shuffle(pairs)

    def load(pair: tuple[str, str]) -> AudioClip | str:
        name, text = pair
        path = Path(sounds) / f"{name}.wav"
        if not path.is_file():
            return "no wav file"
        read = _read(path)
        if isinstance(read, str):
            return read
        inner = re.fullmatch(r"\[(.*)\]|\((.*)\)", text)
        kind = "sound" if inner else "speech"
        caption = f"sound: {inner.group(1) or inner.group(2)}" if inner else f"speech, English: {text}"
        meta = {"source": "asterisk-core-sounds-en", "kind": kind, "language": "en", "speaker": "Allison Smith",
                "name": name, "transcript": text}
        return _clip(f"speech_en-{name}", read[0], read[1], sample_rate, max_seconds, caption, meta)
    return _source("speech_en", len(pairs), *_chunked(pairs, load))


# ---------------------------------------------------------------------------- tuxpaint

def tuxpaint_text(txt: Path, language: str) -> str | None:
    """The stamp's sentence in `language` (English: line 1; others: the `<lang>.utf8=` line), or None."""
    lines = txt.read_text(encoding="utf-8").splitlines()
    if language == "en":
        return (lines[0].strip() or None) if lines and not re.match(r"[\w@]+\.utf8=", lines[0]) else None
    found = [line.split("=", 1)[1].strip() for line in lines if line.startswith(f"{language}.utf8=")]
    return found[0] if found and found[0] else None


def tuxpaint_clips(sample_rate: int, *, stamps: Path = TUXPAINT_STAMPS, max_seconds: float = 10.0,
                   seed: int = 0) -> AudioSource:
    """Tux Paint's spoken stamp descriptions `<name>_desc[_<lang>].ogg`, captioned
    "speech, <Language>: <sentence>" with the sentence from `<name>.txt`."""
    stamps = Path(stamps)
    paths = sorted(stamps.rglob("*_desc*.ogg"))
    random.Random(seed).shuffle(paths)

    def load(path: Path) -> AudioClip | str:
        match = re.fullmatch(r"(.+)_desc(?:_([A-Za-z]+(?:_[A-Z]+)?))?(?:\.ogg)+", path.name)  # one has .ogg.ogg
        if not match:
            return "unrecognised file name"
        stamp, language = match.group(1), match.group(2) or "en"
        txt = path.with_name(f"{stamp}.txt")
        if not txt.is_file():
            return "no caption file"
        try:
            text = tuxpaint_text(txt, language)
        except UnicodeDecodeError:
            return "caption file not UTF-8"
        if text is None:
            return "no sentence in that language"
        read = _read(path)
        if isinstance(read, str):
            return read
        folder = path.parent.relative_to(stamps)
        language_name = LANGUAGES.get(language, language)
        meta = {"source": "tuxpaint-stamps-default", "kind": "speech", "language": language,
                "language_name": language_name, "stamp": stamp, "category": folder.parts[0] if folder.parts else "",
                "folder": folder.as_posix(), "text": text}
        return _clip(f"tuxpaint-{folder.as_posix()}-{stamp}-{language}", read[0], read[1], sample_rate,
                     max_seconds, f"speech, {language_name}: {text}", meta)
    return _source("tuxpaint", len(paths), *_chunked(paths, load))


# ---------------------------------------------------------------------------- instruments (FluidSynth)

def note_name(pitch: int) -> str:
    """MIDI pitch as a note name: 60 -> 'C4', 69 -> 'A4'."""
    return f"{NOTE_NAMES[pitch % 12]}{pitch // 12 - 1}"


def _vlq(value: int) -> bytes:
    out = [value & 0x7F]
    while value > 0x7F:
        value >>= 7
        out.append(0x80 | (value & 0x7F))
    return bytes(reversed(out))


def midi_file(events: Iterable[tuple[int, bytes]], ticks_per_beat: int = _TICKS_PER_BEAT) -> bytes:
    """A format-0 standard MIDI file at 120 BPM of (absolute tick, message bytes) events."""
    track, now = bytearray(b"\x00\xff\x51\x03" + (500_000).to_bytes(3, "big")), 0  # tempo: 0.5 s per beat
    for tick, message in sorted(events, key=lambda e: e[0]):
        track += _vlq(tick - now) + message
        now = tick
    track += b"\x00\xff\x2f\x00"  # end of track
    return (b"MThd" + struct.pack(">IHHH", 6, 0, 1, ticks_per_beat)
            + b"MTrk" + struct.pack(">I", len(track)) + bytes(track))


def instrument_plan(n: int, seed: int = 0, max_seconds: float = 10.0) -> list[dict[str, Any]]:
    """`n` clips, each {key, program, velocity, notes [(on s, off s, pitch)], length s, caption, meta};
    programs cycle through all 128 in seeded random orders; a quarter are melodies. Clip i does
    not depend on `n`."""
    rng = random.Random(seed)
    order: list[int] = []
    plans = []
    for i in range(n):
        if not order:
            order = rng.sample(range(128), 128)
        program, velocity = order.pop(), rng.choice(VELOCITIES)
        family = program // 8
        low, high = _PROGRAM_PITCHES.get(program, _FAMILY_PITCHES[family])
        head = f"{GM_PROGRAMS[program]}, {GM_FAMILIES[family]} family"
        meta: dict[str, Any] = {"source": "fluidsynth FluidR3_GM", "program": program,
                                "instrument": GM_PROGRAMS[program], "family": GM_FAMILIES[family],
                                "family_id": family, "velocity": velocity}
        if rng.random() < 0.75:
            pitch = rng.randint(low, high)
            hold = rng.choice([h for h in _HOLDS if h < max_seconds])
            notes = [(0.0, hold, pitch)]
            caption = f"instrument note, {head}: {note_name(pitch)}, velocity {velocity}, held {hold} s"
            meta |= {"kind": "note", "pitch": pitch, "note": note_name(pitch), "held": hold}
        else:
            root, mode = rng.randrange(12), rng.choice(sorted(_SCALES))
            pool = [p for p in range(low, high + 1) if (p - root) % 12 in _SCALES[mode]]
            tempo, index, at = rng.randrange(80, 161, 10), rng.randrange(len(pool) // 4, 3 * len(pool) // 4), 0.0
            notes = []
            for _ in range(rng.randint(4, 8)):
                length = rng.choice(_BEATS) * 60 / tempo
                if notes and at + length > max_seconds - _RELEASE / 2:
                    break
                notes.append((round(at, 4), round(at + 0.9 * length, 4), pool[index]))
                at += length
                index = min(max(index + rng.choice((-2, -1, -1, 0, 1, 1, 2)), 0), len(pool) - 1)
            key = f"{NOTE_NAMES[root]} {mode}"
            caption = (f"instrument melody, {head}: {len(notes)} notes in {key} at {tempo} BPM, "
                       f"velocity {velocity}")
            meta |= {"kind": "melody", "pitch": [p for _, _, p in notes], "note": [note_name(p) for *_, p in notes],
                     "key": key, "tempo": tempo}
        plans.append({"key": f"instruments-{i:06d}", "program": program, "velocity": velocity, "notes": notes,
                      "length": notes[-1][1] + _RELEASE, "caption": caption, "meta": meta})
    return plans


def _batch_midi(plans: list[dict[str, Any]]) -> tuple[bytes, list[int]]:
    """One MIDI file playing `plans` one after another on channel 0, and each clip's start tick."""
    events, starts, tick = [], [], 0
    for plan in plans:
        starts.append(tick)
        events.append((tick, bytes([0xC0, plan["program"]])))
        for on, off, pitch in plan["notes"]:
            events.append((tick + round(on * _TICKS_PER_SECOND), bytes([0x90, pitch, plan["velocity"]])))
            events.append((tick + round(off * _TICKS_PER_SECOND), bytes([0x80, pitch, 0])))
        end = tick + round(plan["length"] * _TICKS_PER_SECOND)
        events.append((end, bytes([0xB0, 120, 0])))  # all sound off: nothing rings into the next clip
        tick = end + round(_GAP * _TICKS_PER_SECOND)
    return midi_file(events + [(tick, bytes([0xB0, 120, 0]))]), starts


def render_midi(midi: bytes, sample_rate: int, fluidsynth: str = "fluidsynth",
                soundfont: Path = SOUNDFONT) -> np.ndarray:
    """(frames, channels) float32 audio of a MIDI file rendered by FluidSynth (no reverb or chorus)."""
    with tempfile.TemporaryDirectory(prefix="tessera-midi-") as tmp:
        mid, wav = Path(tmp) / "in.mid", Path(tmp) / "out.wav"
        mid.write_bytes(midi)
        command = [fluidsynth, "-ni", "-q", "-R", "0", "-C", "0", "-g", str(_FLUIDSYNTH_GAIN), "-r", str(sample_rate),
                   "-O", "float", "-T", "wav", "-F", str(wav), str(soundfont), str(mid)]
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        if result.returncode != 0 or not wav.is_file():
            detail = (result.stderr.strip().splitlines() or ["no output file"])[-1]
            raise SourceError(f"fluidsynth failed (exit {result.returncode}): {detail}; command: {shlex.join(command)}")
        return sf.read(str(wav), dtype="float32", always_2d=True)[0]


def instrument_clips(sample_rate: int, n: int = DEFAULT_INSTRUMENTS, *, fluidsynth: str = "fluidsynth",
                     soundfont: Path = SOUNDFONT, max_seconds: float = 10.0, seed: int = 0) -> AudioSource:
    """`n` General MIDI notes and melodies (see `instrument_plan`) rendered with FluidSynth,
    `_PER_RENDER` clips per MIDI file, then sliced; notes out of an instrument's range come out silent."""
    plans = instrument_plan(n, seed, max_seconds)

    def load(batch: list[dict[str, Any]]) -> list[AudioClip | str]:
        midi, starts = _batch_midi(batch)
        audio = render_midi(midi, sample_rate, fluidsynth, soundfont)
        clips: list[AudioClip | str] = []
        for plan, tick in zip(batch, starts, strict=True):
            begin = round(tick / _TICKS_PER_SECOND * sample_rate)
            piece = audio[begin:begin + round(plan["length"] * sample_rate)]
            clips.append(_clip(plan["key"], piece, sample_rate, sample_rate, max_seconds, plan["caption"],
                               dict(plan["meta"])))
        return clips
    return _source("instruments", n, [plans[i:i + _PER_RENDER] for i in range(0, n, _PER_RENDER)], load)


# ---------------------------------------------------------------------------- the dataset

def missing_sources(sources: Iterable[str], paths: AudioPaths = AudioPaths()) -> dict[str, str]:
    """{source: what of it is missing} for each of `sources` that is not installed."""
    checks = {"speech_en": [(paths.transcripts.is_file(), f"no {paths.transcripts}"),
                            (any(paths.sounds.glob("*.wav")), f"no {paths.sounds}/*.wav")],
              "tuxpaint": [(paths.stamps.is_dir(), f"no {paths.stamps}")],
              "instruments": [(shutil.which(paths.fluidsynth) is not None, f"no `{paths.fluidsynth}` program on PATH"),
                              (paths.soundfont.is_file(), f"no {paths.soundfont}")]}
    return {name: next(why for ok, why in checks[name] if not ok) for name in sources
            if not all(ok for ok, _ in checks[name])}


def _ensure_installed(sources: Sequence[str], paths: AudioPaths, install: bool) -> None:
    missing = missing_sources(sources, paths)
    packages = [p for name in sources if name in missing for p in _PACKAGES[name]]
    commands = [["apt-get", "update"], ["apt-get", "install", "-y", *packages]]
    if missing and install:
        _run_install(commands)
        missing = missing_sources(sources, paths)
    if missing:
        what = ", ".join(f"{name} ({why})" for name, why in missing.items())
        raise SourceError(f"audio source(s) not installed: {what}; install with: "
                          f"{' && '.join(shlex.join(c) for c in commands)}   (or add --install)")


def _interleave(sources: list[AudioSource], rng: random.Random) -> Iterator[tuple[AudioSource, AudioClip]]:
    """Clips of all sources mixed at random, each source drawn in proportion to what it has left."""
    active = [(source, iter(source.clips)) for source in sources]
    while active:
        left = [max(s.found - s.written - s.skipped.total(), 1) for s, _ in active]
        index = rng.choices(range(len(active)), weights=left)[0]
        source, clips = active[index]
        clip = next(clips, None)
        if clip is None:
            del active[index]
        else:
            yield source, clip


def write_audio_dataset(out: str | Path, sample_rate: int = 16000, sources: Sequence[str] = AUDIO_SOURCES, *,
                        install: bool = False, per_shard: int = 2000, max_seconds: float = 10.0,
                        instruments_n: int = DEFAULT_INSTRUMENTS, seed: int = 0, paths: AudioPaths = AudioPaths(),
                        progress: bool = True) -> dict[str, Any]:
    """The chosen sources' clips, mixed in a seeded random order, as FLAC/txt/json shards in `out`.

    Returns dataset.json's contents plus "sources" ({name: found, written, skipped {reason: n},
    seconds}) and "seconds" (total). All sources are checked (and with `install`, installed)
    before anything is written.
    """
    check_range("sample_rate", sample_rate, 8000, 48000)
    check_range("max_seconds", max_seconds, 1.0)
    check_range("instruments_n", instruments_n, 1)
    sources = list(dict.fromkeys(sources.split(",") if isinstance(sources, str) else sources))
    unknown = [s for s in sources if s not in AUDIO_SOURCES]
    if unknown or not sources:
        raise ConfigError(f"unknown audio source(s) {unknown or sources}; valid: {', '.join(AUDIO_SOURCES)}")
    _ensure_installed(sources, paths, install)
    made = {"speech_en": lambda: speech_en_clips(sample_rate, transcripts=paths.transcripts, sounds=paths.sounds,
                                                 max_seconds=max_seconds, seed=seed),
            "tuxpaint": lambda: tuxpaint_clips(sample_rate, stamps=paths.stamps, max_seconds=max_seconds, seed=seed),
            "instruments": lambda: instrument_clips(sample_rate, instruments_n, fluidsynth=paths.fluidsynth,
                                                    soundfont=paths.soundfont, max_seconds=max_seconds, seed=seed)}
    chosen = [made[name]() for name in sources]
    info = DatasetInfo(name=f"audio-{'-'.join(sources)}-{sample_rate}",
                       source="Debian " + ", ".join(p for s in sources for p in _PACKAGES[s]),
                       license="; ".join(f"{s}: {_LICENSES[s]}" for s in sources), resolution=0,
                       sample_rate=sample_rate)
    keys: set[str] = set()
    with DatasetWriter(out, info, prefix="audio", per_shard=per_shard) as writer, \
            tqdm(total=sum(s.found for s in chosen), desc="audio", unit="clip", disable=not progress) as bar:
        for source, clip in _interleave(chosen, random.Random(seed)):
            if clip.key in keys:
                source.skipped["duplicate key"] += 1
            else:
                keys.add(clip.key)
                meta = json.dumps(clip.meta, ensure_ascii=False).encode("utf-8")
                writer.write_record(clip.key, {"flac": encode_flac(clip.audio, sample_rate),
                                               "txt": clip.caption.encode("utf-8"), "json": meta})
                source.written += 1
                source.seconds += len(clip.audio) / sample_rate
            bar.update(sum(s.written + s.skipped.total() for s in chosen) - bar.n)
        report = {s.name: s.report() for s in chosen}
        info.description = (f"captioned mono audio at {sample_rate} Hz, clips up to {max_seconds} s; "
                            f"per source: {json.dumps(report)}")  # dataset.json is written when the block ends
    return {**writer.info, "sources": report, "seconds": round(sum(s.seconds for s in chosen), 1)}
