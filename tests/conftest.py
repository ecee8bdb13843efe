import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def audio_shards(tmp_path_factory):
    """A tiny captioned audio dataset (16 kHz FLAC sine tones and chords, 0.4 s) in shard form."""
    import json

    import numpy as np

    from tessera.data.audio_sources import encode_flac
    from tessera.data.shards import DatasetInfo, DatasetWriter

    folder = tmp_path_factory.mktemp("audio") / "shards"
    rate, t = 16000, np.arange(6400) / 16000
    info = DatasetInfo(name="tones", source="test", license="none", resolution=0, sample_rate=rate)
    with DatasetWriter(folder, info, prefix="audio", per_shard=4) as writer:
        for i, pitch in enumerate((220.0, 330.0, 440.0, 550.0, 660.0, 880.0)):
            wave = 0.3 * np.sin(2 * np.pi * pitch * t) + 0.1 * np.sin(2 * np.pi * 2 * pitch * t)
            caption = f"instrument note, sine, pitch {int(pitch)} Hz"
            writer.write_record(f"tone-{i}", {"flac": encode_flac(wave.astype(np.float32), rate),
                                              "txt": caption.encode(), "json": json.dumps({"pitch": pitch}).encode()})
    return folder
