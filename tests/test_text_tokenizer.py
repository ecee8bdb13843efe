"""Caption tokenizer: training, atomic save, load errors, round trip, truncation and padding."""
import pytest
import torch

from tessera.tokenizers.text import TextTokenizer, train_text_tokenizer

CAPTIONS = [
    "a red circle left of a blue square",
    "two green triangles below a yellow star",
    "A Big Purple Square above a small red circle",
    "three blue circles",
] * 10


@pytest.fixture()
def trained(tmp_path):
    return train_text_tokenizer(iter(CAPTIONS), vocab_size=80, out_path=tmp_path / "sub" / "tokenizer.json")


def test_train_writes_tokenizer_json_atomically(tmp_path, trained):
    folder = tmp_path / "sub"
    assert [p.name for p in folder.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    assert TextTokenizer.load(folder).vocab_size == trained.vocab_size  # a folder holding tokenizer.json works
    assert 30 < trained.vocab_size <= 80
    assert trained.pad_id == 0


def test_round_trip_lowercases(trained):
    ids = trained.encode_batch(["A red circle LEFT of a blue square"], max_len=16)[0]
    assert trained.decode(ids) == "a red circle left of a blue square"
    assert trained.decode(ids.tolist()) == "a red circle left of a blue square"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned-memory copy to a GPU needs one")
def test_ids_reach_the_gpu_equal_to_the_cpu_ids(trained):
    texts = ["three blue circles", CAPTIONS[1]]
    on_gpu = trained.encode_batch(texts, max_len=8, device="cuda")
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), trained.encode_batch(texts, max_len=8))


def test_padding_and_truncation(trained):
    ids = trained.encode_batch(["three blue circles", CAPTIONS[1] + " " + CAPTIONS[2]], max_len=8)
    assert ids.shape == (2, 8) and ids.dtype == torch.long
    bos, eos = (trained.tokenizer.token_to_id(t) for t in ("[BOS]", "[EOS]"))
    short = ids[0].tolist()
    n = short.index(eos) + 1
    assert short[0] == bos and n < 8 and short[n:] == [trained.pad_id] * (8 - n)
    assert ids[1, 0] == bos and ids[1, -1] == eos and trained.pad_id not in ids[1].tolist()
    assert trained.decode(ids[1]).startswith("two green")
    # a different max_len on the same object takes effect
    assert trained.encode_batch(["three blue circles"], max_len=12).shape == (1, 12)
    with pytest.raises(ValueError, match="max_len"):
        trained.encode_batch(["x"], max_len=1)


def test_unseen_characters_map_to_unk(trained):
    ids = trained.encode_batch(["a red 🦒"], max_len=10)[0].tolist()
    assert trained.tokenizer.token_to_id("[UNK]") in ids


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="text tokenizer not found"):
        TextTokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="is not a HF tokenizers JSON file"):
        TextTokenizer.load(bad)


def test_vocab_size_too_small(tmp_path):
    with pytest.raises(ValueError, match="special tokens"):
        train_text_tokenizer(CAPTIONS, vocab_size=4, out_path=tmp_path / "t.json")
