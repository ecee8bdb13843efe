"""FID / IS / precision-recall: parity with torch-fidelity 0.4.0, the Frechet formula, and bad inputs."""
import hashlib

import tessera  # noqa: F401  (first: installs the torchvision shim that torch_fidelity's import needs)

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from tessera.eval.fid import (EvalInputError, FeatureStats, fid_from_stats, folder_stats, frechet_distance,
                              image_features, inception_score, iter_image_folder, precision_recall,
                              read_image_folder, stats_cache_path)
from tessera.eval.inception import (WEIGHTS_ENV, FIDInceptionV3, InceptionWeightsError, InceptionWeightsNotFound,
                                    load_inception, resize_like_tf1)


def _save_png(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def _blocks(rng, cells, size=32):
    """Random colour blocks: `cells` x `cells` cells on a size x size image."""
    return np.kron(rng.randint(0, 256, (cells, cells, 3)), np.ones((size // cells, size // cells, 1)))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A seeded random FID Inception saved like torch-fidelity's file: a plain dict, no num_batches_tracked."""
    torch.manual_seed(1234)
    model = FIDInceptionV3()
    with torch.no_grad():
        for module in model.modules():  # variance-preserving init, so the random features are not degenerate
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.8, 1.2)
                module.weight.uniform_(0.8, 1.2)
                module.bias.uniform_(-0.1, 0.1)
        torch.nn.init.normal_(model.fc.weight, std=0.5)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def image_dirs(tmp_path_factory):
    """16 'real' and 16 'fake' 32x32 PNGs that overlap in half of their distribution (8x8 blocks)."""
    rng = np.random.RandomState(7)
    root = tmp_path_factory.mktemp("images")
    real, fake = root / "real", root / "fake"
    real.mkdir()
    fake.mkdir()
    for i in range(16):
        _save_png(real / f"{i:03d}.png", _blocks(rng, 8 if i < 8 else 16))
        _save_png(fake / f"{i:03d}.png", _blocks(rng, 8 if i < 8 else 4))
    return real, fake


# --- (a) parity with torch-fidelity --------------------------------------------------------

def test_resize_matches_torch_fidelity():
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = torch.rand(2, 3, 37, 53) * 255
    ref = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert torch.equal(resize_like_tf1(x), ref)


def test_parity_with_torch_fidelity(weights_file, image_dirs, monkeypatch, tmp_path):
    import torch_fidelity
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def no_download(*args, **kwargs):
        raise AssertionError("torch-fidelity tried to download its Inception weights")

    loaded = []
    torch_load = torch.load

    def recording_load(path, *args, **kwargs):
        loaded.append(str(path))
        return torch_load(path, *args, **kwargs)

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(tf_inception.torch, "load", recording_load)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    real, fake = image_dirs

    ref = torch_fidelity.calculate_metrics(
        input1=str(fake), input2=str(real), cuda=False, isc=True, fid=True, prc=True,
        feature_extractor="inception-v3-compat",  # 0.4.0 would otherwise take VGG16 features for prc
        feature_extractor_weights_path=str(weights_file), isc_splits=2, prc_neighborhood=3,
        batch_size=16, save_cpu_ram=True, cache=False, verbose=False)
    assert loaded == [str(weights_file)], "torch-fidelity did not load the given weights file"

    model = load_inception(weights_file)
    fake_pool, fake_logits = image_features(iter_image_folder(fake), model, batch_size=16)
    real_pool, _ = image_features(iter_image_folder(real), model, batch_size=16)
    with pytest.warns(UserWarning, match="unreliable"):
        fid = fid_from_stats(FeatureStats.from_features(fake_pool), FeatureStats.from_features(real_pool))
    is_mean, is_std = inception_score(fake_logits, splits=2)
    precision, recall = precision_recall(real_pool, fake_pool, k=3)

    print(f"\nFID tessera {fid!r} torch-fidelity {ref['frechet_inception_distance']!r}"
          f"\nIS  tessera {is_mean!r}±{is_std!r} torch-fidelity {ref['inception_score_mean']!r}"
          f"±{ref['inception_score_std']!r}"
          f"\nP/R tessera {precision!r}/{recall!r} torch-fidelity {ref['precision']!r}/{ref['recall']!r}")
    assert fid > 1.0
    assert fid == pytest.approx(ref["frechet_inception_distance"], rel=1e-3)
    assert is_mean == pytest.approx(ref["inception_score_mean"], rel=1e-3)
    assert is_std == pytest.approx(ref["inception_score_std"], rel=1e-2, abs=1e-9)
    assert 0.0 < precision < 1.0 and 0.0 < recall < 1.0, "test data should give non-trivial precision/recall"
    assert precision == ref["precision"]
    assert recall == ref["recall"]


# --- (b) the Frechet distance ------------------------------------------------------------------

def _scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(0.3, 1.0, size=(300, 16)) @ rng.normal(size=(16, 16))
    sa, sb = FeatureStats.from_features(a), FeatureStats.from_features(b)
    assert sa.n == 400 and sa.mu.dtype == np.float64 and sa.sigma.shape == (16, 16)
    got = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert got == pytest.approx(_scipy_fid(sa.mu, sa.sigma, sb.mu, sb.sigma), rel=1e-9)
    assert abs(frechet_distance(sa.mu, sa.sigma, sa.mu, sa.sigma)) < 1e-9 * np.trace(sa.sigma)


def test_frechet_distance_closed_form():
    d, mu1, mu2 = 8, np.zeros(8), np.full(8, 0.5)
    got = frechet_distance(mu1, 4.0 * np.eye(d), mu2, 9.0 * np.eye(d))  # sigma 2 vs 3
    assert got == pytest.approx(d * 0.25 + d * (2.0 - 3.0) ** 2, rel=1e-12)


def test_inception_score_known_values():
    c = 8
    confident = torch.full((4 * c, c), -50.0)
    confident[torch.arange(4 * c), torch.arange(4 * c) % c] = 50.0  # sure of one class, classes balanced
    mean, std = inception_score(confident, splits=4, shuffle=False)
    assert mean == pytest.approx(c, rel=1e-9) and std < 1e-9
    assert inception_score(torch.zeros(10, c), splits=2)[0] == pytest.approx(1.0)  # uninformative: IS 1
    logits = torch.randn(30, c, dtype=torch.float64) * 3
    p = torch.softmax(logits, 1).numpy()
    expected = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), axis=1)))
    assert inception_score(logits, splits=1)[0] == pytest.approx(expected, rel=1e-12)
    huge = torch.zeros(6, c)
    huge[:, 0] = 1e4  # softmax underflows to exact zeros: still finite
    assert inception_score(huge, splits=1)[0] == pytest.approx(1.0)


# --- (c) bad inputs ----------------------------------------------------------------------------

def test_weights_file_of_wrong_format(tmp_path):
    for name in ("junk.pth", "junk.safetensors"):
        path = tmp_path / name
        path.write_bytes(b"this is not a weights file")
        with pytest.raises(InceptionWeightsError, match="not a readable"):
            load_inception(path)


def test_state_dict_of_wrong_keys_or_shapes(tmp_path):
    state = FIDInceptionV3().state_dict()
    bad_shape = dict(state, **{"fc.weight": torch.zeros(10, 2048)})
    torch.save(bad_shape, tmp_path / "shape.pth")
    with pytest.raises(InceptionWeightsError, match=r"shape mismatches \(e.g. fc.weight: \(10, 2048\)"):
        load_inception(tmp_path / "shape.pth")
    missing = {k: v for k, v in state.items() if not k.startswith("Mixed_7c.")}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(InceptionWeightsError, match="missing keys"):
        load_inception(tmp_path / "missing.pth")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(InceptionWeightsError, match="unexpected keys"):
        load_inception(tmp_path / "other.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(InceptionWeightsError, match="not a mapping"):
        load_inception(tmp_path / "list.pth")


def test_missing_weights_never_download(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(InceptionWeightsNotFound, match=WEIGHTS_ENV):
        load_inception()
    with pytest.raises(FileNotFoundError, match="not found"):
        load_inception(tmp_path / "absent.pth")


def test_weights_from_env_and_safetensors(weights_file, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv(WEIGHTS_ENV, str(weights_file))
    model = load_inception()
    assert model.sha256 == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    st_path = tmp_path / "inception.safetensors"
    save_file({k: v for k, v in model.state_dict().items()}, str(st_path))
    again = load_inception(st_path)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="uint8"):
        model(torch.zeros(1, 3, 8, 8))


def test_empty_folder_and_mixed_resolutions(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(EvalInputError, match="no .png images"):
        read_image_folder(empty)
    with pytest.raises(EvalInputError, match="not found"):
        read_image_folder(tmp_path / "absent")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _save_png(mixed / "a.png", np.zeros((32, 32, 3)))
    _save_png(mixed / "b.png", np.zeros((16, 16, 3)))
    with pytest.raises(EvalInputError, match="mixed resolutions.*32x32.*b.png is 16x16"):
        read_image_folder(mixed)
    same = tmp_path / "same"
    same.mkdir()
    for i in range(3):
        _save_png(same / f"{i}.png", np.full((8, 6, 3), 40 * i))
    images = read_image_folder(same)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 8, 6) and images[2].max() == 80


def test_small_sample_warning_and_errors():
    rng = np.random.default_rng(1)
    a, b = FeatureStats.from_features(rng.normal(size=(50, 4))), FeatureStats.from_features(rng.normal(size=(60, 4)))
    with pytest.warns(UserWarning, match="50 < 2048 samples is unreliable"):
        fid_from_stats(a, b)
    with pytest.raises(EvalInputError, match="at least 2 samples"):
        FeatureStats.from_features(np.ones((1, 4)))
    with pytest.raises(EvalInputError, match="covariances must be"):
        frechet_distance(a.mu, a.sigma, b.mu, np.eye(3))
    with pytest.raises(EvalInputError, match="splits=30"):
        inception_score(torch.zeros(20, 10), splits=30)
    with pytest.raises(EvalInputError, match="k=3 needs more than 3"):
        precision_recall(torch.zeros(3, 4), torch.zeros(10, 4), k=3)


def test_stats_file_round_trip(tmp_path):
    stats = FeatureStats.from_features(np.random.default_rng(2).normal(size=(30, 5)))
    stats.save(tmp_path / "s.npz", reference="somewhere")
    back = FeatureStats.load(tmp_path / "s.npz")
    assert back.n == 30 and np.array_equal(back.mu, stats.mu) and np.array_equal(back.sigma, stats.sigma)
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temporary file left behind
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(EvalInputError, match="lacks"):
        FeatureStats.load(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(EvalInputError, match="cannot read"):
        FeatureStats.load(tmp_path / "junk.npz")


class _MeanColour(torch.nn.Module):
    """A stand-in feature network (mean colour) that counts its calls."""

    def __init__(self, sha256):
        super().__init__()
        self.sha256 = sha256
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        pool = images.float().mean(dim=(2, 3)) * self.scale
        return pool, pool


def test_reference_stats_cache(tmp_path):
    folder = tmp_path / "ref"
    folder.mkdir()
    rng = np.random.RandomState(3)
    for i in range(6):
        _save_png(folder / f"{i}.png", rng.randint(0, 256, (8, 8, 3)))
    net, cache = _MeanColour("a" * 64), tmp_path / "cache"
    first = folder_stats(folder, net, cache_dir=cache, batch_size=4)
    assert net.calls == 2 and stats_cache_path(folder, net, cache).is_file()
    second = folder_stats(folder, net, cache_dir=cache)
    assert net.calls == 2 and np.array_equal(first.sigma, second.sigma) and second.n == 6
    other = _MeanColour("b" * 64)
    assert stats_cache_path(folder, other, cache) != stats_cache_path(folder, net, cache)
    _save_png(folder / "6.png", rng.randint(0, 256, (8, 8, 3)))
    assert folder_stats(folder, net, cache_dir=cache).n == 7 and net.calls == 3
