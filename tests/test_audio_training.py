"""The trainer on audio shards: the codec trains through `tessera train` and previews are WAV files."""
import soundfile

from tessera.modeling import TesseraModel
from tessera.train.recipe import Recipe
from tessera.train.trainer import train


def test_codec_trains_from_audio_shards_and_writes_wav_previews(audio_shards, tmp_path):
    recipe = Recipe.from_dict({
        "model": {"kind": "audio_codec", "preset": "tiny", "config": {"clip_seconds": 0.25}},
        "data": {"shards": str(audio_shards)},
        "train": {"steps": 3, "batch_size": 2, "log_every": 1, "ckpt_every": 3, "sample_every": 3, "warmup_steps": 1},
        "out": str(tmp_path / "codec")})
    metrics = train(recipe, progress=False)
    assert metrics["step"] == 3 and "si_snr" in metrics and "usage_q3" in metrics
    preview = tmp_path / "codec" / "samples" / "step-0000003.wav"
    audio, rate = soundfile.read(str(preview))
    # input, reconstruction for both 0.25 s crops of the batch, 0.25 s of silence between clips
    assert rate == 16000 and len(audio) == 7 * 4000
    codec = TesseraModel.from_pretrained(tmp_path / "codec")
    assert codec.kind == "audio_codec" and codec.sample_rate == 16000

