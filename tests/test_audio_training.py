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



def test_eval_codec_reports_the_bitrate_ladder(audio_shards, tmp_path, capsys):
    import json

    import pytest

    from tessera.cli import main
    from tessera.registry import build_model
    build_model("audio_codec", "tiny").save_pretrained(tmp_path / "codec")
    out = tmp_path / "codec_eval.json"
    main(["eval", "codec", "--ckpt", str(tmp_path / "codec"), "--shards", str(audio_shards), "--n", "3",
          "--batch-size", "2", "--clip-seconds", "0.25", "--device", "cpu", "--out", str(out)])
    report = json.loads(out.read_text())
    ladder = report["by_codebooks"]
    assert list(ladder) == ["1", "2", "3", "4"] and report["items"] == 4  # whole batches: 2 of 2 clips
    assert [r["bitrate_kbps"] for r in ladder.values()] == pytest.approx([2.4 * k for k in range(1, 5)])  # 6 bits x 400 Hz
    assert report["si_snr_db"] == ladder["4"]["si_snr_db"] and "SI-SNR" in capsys.readouterr().out
    build_model("next_token", "tiny", vocab_size=16, grid_size=2, num_classes=2).save_pretrained(tmp_path / "other")
    assert main(["eval", "codec", "--ckpt", str(tmp_path / "other"), "--shards", str(audio_shards),
                 "--device", "cpu"]) == 2
    assert "holds a 'next_token' model, not an audio codec" in capsys.readouterr().err
