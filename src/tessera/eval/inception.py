"""The FID Inception-v3 (TF graph 2015-12-05), in pure torch, with torch-fidelity's state-dict layout.

Module names and shapes follow torch-fidelity's `FeatureExtractorInceptionV3`, so its converted
weights file `weights-inception-2015-12-05-6726825d.pth` loads strictly. The TF graph differs from
torchvision's Inception-v3 in three places, all reproduced here: average pools inside the blocks do
not count padding, the last block (`Mixed_7c`) pools with max instead of average, and the classifier
has 1008 outputs. Weights are read from a local file only; nothing is ever downloaded.

Resize: images go to 299x299 with TensorFlow 1.x's bilinear resize (`align_corners=False`, which in
TF1 means `src = dst * in/out` with no half-pixel offset), the same one torch-fidelity uses. The
reference statistics everyone compares against (TTUR, the ADM evaluator) come from the TF graph,
which resizes this way, so it is the resize that reproduces the published protocol; torch's own
`F.interpolate(bilinear)` samples half a pixel elsewhere and shifts FID. Pixels are then mapped
to [-1, 1) as `(x - 128) / 128`, as in the graph.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import CheckpointError

WEIGHTS_ENV = "TESSERA_INCEPTION_WEIGHTS"
PUBLISHED_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's release asset
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008


class InceptionWeightsError(CheckpointError):
    """A weights file that is not a usable FID Inception state dict."""


class InceptionWeightsNotFound(InceptionWeightsError, FileNotFoundError):
    """No weights file given, or the given path does not exist."""


def resize_like_tf1(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Bilinear resize of float (B,C,H,W) images exactly as TF 1.x `resize_bilinear(align_corners=False)`.

    Source coordinate of output pixel i is `i * in/out` (float32), interpolated between the two
    neighbouring input pixels (the upper one clamped to the edge): x then y.
    """
    def taps(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = torch.arange(size, dtype=images.dtype, device=images.device)
        pos = pos * torch.tensor(n_in / size, dtype=torch.float32, device=images.device)
        lo = pos.long()
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, pos - lo.float()

    y_lo, y_hi, wy = taps(images.shape[2])
    x_lo, x_hi, wx = taps(images.shape[3])
    top, bottom = images.index_select(2, y_lo), images.index_select(2, y_hi)
    wx = wx.view(1, 1, 1, size)
    top_l, top_r = top.index_select(3, x_lo), top.index_select(3, x_hi)
    bot_l, bot_r = bottom.index_select(3, x_lo), bottom.index_select(3, x_hi)
    upper = top_l + (top_r - top_l) * wx
    lower = bot_l + (bot_r - bot_l) * wx
    return upper + (lower - upper) * wy.view(1, 1, size, 1)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int | tuple[int, int],
                 stride: int = 1, padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """TF's 3x3 SAME average pool: padded zeros are not counted."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction block."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions."""

    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction block."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 heads; the TF graph's last one (`max_pool=True`) pools with max."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """uint8 images (B,3,H,W) -> (2048-d pool features, 1008 unbiased logits), both float32.

    The logits are `pool @ fc.weight.T` without the bias: torch-fidelity's 'logits_unbiased',
    which its Inception Score uses. `sha256` holds the hex digest of the loaded weights file.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sha256: str | None = None
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.AvgPool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images of shape (B,3,H,W), got {images.dtype} {tuple(images.shape)}")
        x = resize_like_tf1(images.float())
        x = (x - 128) / 128
        for stage in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.MaxPool_1,
                      self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.MaxPool_2,
                      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = stage(x)
        pool = torch.flatten(self.AvgPool(x), 1)
        return pool, pool.mm(self.fc.weight.T)


def _read_state_dict(path: Path) -> Mapping[str, Any]:
    """Read a state dict from a .safetensors or torch file, turning any read failure into one error."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - every reader error means "not a weights file"
        kind = "safetensors" if path.suffix == ".safetensors" else "torch (weights_only)"
        raise InceptionWeightsError(
            f"{path} is not a readable {kind} weights file: {type(err).__name__}: {err}") from None


def check_state_dict(state: Any, model: nn.Module, source: str = "state dict") -> dict[str, torch.Tensor]:
    """Check keys and shapes against `model`, returning a complete state dict.

    BatchNorm `num_batches_tracked` entries may be absent (the published file has none).
    """
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InceptionWeightsError(f"{source} is not a mapping of names to tensors")
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected)
                   if k not in optional and tuple(state[k].shape) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} shape mismatches (e.g. {k}: {tuple(state[k].shape)}, "
                        f"expected {tuple(expected[k].shape)})")
    if problems:
        raise InceptionWeightsError(f"{source} is not an FID Inception-v3 state dict: " + "; ".join(problems))
    full = dict(state)
    for k in optional:
        full.setdefault(k, expected[k])
    return full


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_weights_path(path: str | Path | None = None) -> Path:
    """The weights file from `path`, else from $TESSERA_INCEPTION_WEIGHTS; it must exist."""
    if path is None:
        path = os.environ.get(WEIGHTS_ENV) or None
    if path is None:
        raise InceptionWeightsNotFound(
            f"no Inception weights given: pass a path or set ${WEIGHTS_ENV} to a local copy of "
            f"{PUBLISHED_WEIGHTS_NAME} (nothing is downloaded)")
    path = Path(path).expanduser()
    if not path.is_file():
        raise InceptionWeightsNotFound(f"Inception weights file not found: {path}")
    return path


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """Build the FID Inception from a local weights file (.safetensors or torch), in eval mode, frozen."""
    path = resolve_weights_path(path)
    model = FIDInceptionV3()
    state = check_state_dict(_read_state_dict(path), model, source=str(path))
    model.load_state_dict(state, strict=True)
    model.sha256 = _sha256(path)
    return model.requires_grad_(False).eval().to(device)
