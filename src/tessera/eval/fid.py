"""FID, Inception Score and precision/recall on Inception features, computed as torch-fidelity 0.4.0 does.

- Features: `image_features` runs the FID Inception (`tessera.eval.inception`) over uint8 images and
  returns the 2048-d pool features (FID, precision/recall) and the 1008 unbiased logits (IS).
- FID: `FeatureStats` (mean, covariance, count; saved as .npz, cached per reference folder and
  weights hash) and `frechet_distance`, in float64, with torch-fidelity's eigenvalue formula.
- IS: `inception_score`, torch-fidelity's split scheme including its seeded shuffle.
- Precision/recall: `precision_recall`, Kynkaenniemi et al. 2019 with k-NN balls (k=3).

An FID from fewer than 2048 samples is unreliable (the covariance has rank < 2048 and the estimate
is biased upward), so `fid_from_stats` warns; published FIDs use 50k samples.
"""
from __future__ import annotations

import hashlib
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..config import ConfigError
from .inception import FIDInceptionV3

MIN_RELIABLE_SAMPLES = 2048
ISC_SHUFFLE_SEED = 2020  # torch-fidelity's default rng_seed for the IS shuffle


class EvalInputError(ConfigError):
    """Images, features or statistics that these metrics cannot use."""


# --- image folders -------------------------------------------------------------------------

def list_pngs(folder: str | Path) -> list[Path]:
    """The PNG files directly inside `folder`, sorted by name; an error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalInputError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise EvalInputError(f"no .png images in {folder}")
    return files


def _read_png(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def iter_image_folder(folder: str | Path) -> Iterator[torch.Tensor]:
    """Yield each PNG of `folder` as a uint8 (3,H,W) tensor, in name order; all must share one resolution.

    The folder is checked (exists, holds PNGs) when this is called, not on first iteration.
    """
    files = list_pngs(folder)

    def images() -> Iterator[torch.Tensor]:
        size: tuple[int, int] | None = None
        for path in files:
            image = _read_png(path)
            if size is None:
                size = tuple(image.shape[1:])
            elif tuple(image.shape[1:]) != size:
                raise EvalInputError(f"mixed resolutions in {Path(folder)}: {files[0].name} is "
                                     f"{size[0]}x{size[1]}, {path.name} is {image.shape[1]}x{image.shape[2]}")
            yield image

    return _Sized(images(), len(files))


class _Sized(Iterator[torch.Tensor]):
    """An iterator that knows its length (for the progress bar)."""

    def __init__(self, it: Iterator[torch.Tensor], n: int) -> None:
        self._it, self._n = it, n

    def __len__(self) -> int:
        return self._n

    def __next__(self) -> torch.Tensor:
        return next(self._it)


def read_image_folder(folder: str | Path) -> torch.Tensor:
    """All PNGs of `folder` as one uint8 (N,3,H,W) tensor, in name order."""
    return torch.stack(list(iter_image_folder(folder)))


# --- features ------------------------------------------------------------------------------

@torch.inference_mode()
def image_features(images: Iterable[torch.Tensor], model: FIDInceptionV3, batch_size: int = 50,
                   device: str | torch.device | None = None,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool features (N,2048) and unbiased logits (N,1008), float32 on the CPU.

    `images` yields uint8 images (3,H,W) or batches (B,3,H,W), or is one (N,3,H,W) tensor.
    `device` defaults to the model's device.
    """
    if batch_size < 1:
        raise EvalInputError(f"batch_size={batch_size} must be at least 1")
    if device is None:
        device = next(model.parameters()).device
    model = model.to(device).eval()
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        images = images.split(batch_size)
        total = sum(len(b) for b in images)
    else:
        total = len(images) if hasattr(images, "__len__") else None  # type: ignore[arg-type]
    pools: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        if pending:
            batch = torch.cat(pending).to(device)
            pending.clear()
            pool, logit = model(batch)
            pools.append(pool.float().cpu())
            logits.append(logit.float().cpu())
            bar.update(batch.shape[0])

    with tqdm(total=total, desc="inception", unit="img", disable=not progress) as bar:
        queued = 0
        for item in images:
            item = item if item.dim() == 4 else item.unsqueeze(0)
            if pending and item.shape[1:] != pending[0].shape[1:]:
                flush()
                queued = 0
            pending.append(item)
            queued += item.shape[0]
            if queued >= batch_size:
                flush()
                queued = 0
        flush()
    if not pools:
        raise EvalInputError("no images to compute features from")
    return torch.cat(pools), torch.cat(logits)


# --- FID -----------------------------------------------------------------------------------

@dataclass
class FeatureStats:
    """Mean (D,), covariance (D,D), both float64, and the number of samples `n` behind them."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def from_features(cls, features: torch.Tensor | np.ndarray) -> "FeatureStats":
        """Mean and unbiased covariance (as numpy's `cov`) of (N,D) features, in float64."""
        feats = np.asarray(features.cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
        if feats.ndim != 2:
            raise EvalInputError(f"features must be (N, D), got shape {feats.shape}")
        if feats.shape[0] < 2:
            raise EvalInputError(f"need at least 2 samples for a covariance, got {feats.shape[0]}")
        return cls(mu=feats.mean(axis=0), sigma=np.cov(feats, rowvar=False), n=int(feats.shape[0]))

    def save(self, path: str | Path, **meta: str) -> None:
        """Write an .npz (mu, sigma, n, plus string `meta`) under a temporary name, then rename it into place."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, mu=self.mu, sigma=self.sigma, n=np.int64(self.n),
                         **{k: np.str_(v) for k, v in meta.items()})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        """Read stats written by `save`; an error names what is missing or inconsistent."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = {"mu", "sigma", "n"} - set(data.files)
                if missing:
                    raise EvalInputError(f"{path} lacks {sorted(missing)}; not an FID statistics file")
                mu, sigma, n = data["mu"].astype(np.float64), data["sigma"].astype(np.float64), int(data["n"])
        except (OSError, ValueError) as err:
            if isinstance(err, EvalInputError):
                raise
            raise EvalInputError(f"cannot read FID statistics {path}: {err}") from None
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise EvalInputError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not match")
        return cls(mu=mu, sigma=sigma, n=n)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    The trace of the matrix square root is taken as the sum of square roots of the eigenvalues
    of S1 S2, as torch-fidelity does (S1 S2 is similar to the PSD matrix S1^(1/2) S2 S1^(1/2), so
    its eigenvalues are real and >= 0 up to rounding; rounding noise is handled by a complex square
    root whose real part is kept). pytorch-fid and clean-fid instead call `scipy.linalg.sqrtm`,
    retry with 1e-6 added to the diagonals if the result is not finite, and fail on large imaginary
    parts. Both agree on well-conditioned covariances; the eigenvalue route never fails, is faster,
    and matches torch-fidelity tightly. The result is not clamped, so identical inputs give
    approximately 0, possibly a tiny negative number.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise EvalInputError(f"means must be 1-D of one length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise EvalInputError(f"covariances must be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)
    tr_covmean = np.sqrt(eigenvalues).real.sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two sets of statistics; warns when either rests on fewer than 2048 samples."""
    n = min(a.n, b.n)
    if n < MIN_RELIABLE_SAMPLES:
        warnings.warn(f"FID from {n} < {MIN_RELIABLE_SAMPLES} samples is unreliable (rank-deficient covariance, "
                      "biased upward); published FIDs use 50k samples", stacklevel=2)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def _weights_key(model: FIDInceptionV3) -> str:
    """The SHA-256 of the model's weights file, or of its parameters when it was not loaded from one."""
    if model.sha256:
        return model.sha256
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def stats_cache_path(folder: str | Path, model: FIDInceptionV3, cache_dir: str | Path) -> Path:
    """Where the stats of `folder` under these weights are cached.

    Keyed by the folder's real path and the weights hash, plus the PNGs' names, sizes and mtimes so
    that a changed folder is not served stale statistics.
    """
    folder = Path(folder).resolve()
    key = hashlib.sha256(f"{folder}\n{_weights_key(model)}\n".encode())
    for path in list_pngs(folder):
        st = path.stat()
        key.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return Path(cache_dir) / f"fid-stats-{key.hexdigest()[:24]}.npz"


def folder_stats(folder: str | Path, model: FIDInceptionV3, cache_dir: str | Path | None = None,
                 batch_size: int = 50, device: str | torch.device | None = None,
                 progress: bool = False) -> FeatureStats:
    """FID statistics of a PNG folder, read from / written to `cache_dir` when one is given."""
    cache = stats_cache_path(folder, model, cache_dir) if cache_dir is not None else None
    if cache is not None and cache.is_file():
        return FeatureStats.load(cache)
    pool, _ = image_features(iter_image_folder(folder), model, batch_size, device, progress)
    stats = FeatureStats.from_features(pool)
    if cache is not None:
        stats.save(cache, reference=str(Path(folder).resolve()), weights_sha256=_weights_key(model))
    return stats


# --- Inception Score -----------------------------------------------------------------------

def inception_score(logits: torch.Tensor | np.ndarray, splits: int = 10, shuffle: bool = True,
                    seed: int = ISC_SHUFFLE_SEED) -> tuple[float, float]:
    """Mean and (population) std over `splits` of exp(E_x KL(p(y|x) || p(y))), as torch-fidelity's isc.

    Rows are first permuted with `np.random.RandomState(seed)` (torch-fidelity's default shuffle),
    then cut into `splits` contiguous chunks; softmax in float64. Use the unbiased logits.
    """
    x = torch.as_tensor(logits).detach().cpu()
    if x.dim() != 2:
        raise EvalInputError(f"logits must be (N, C), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= splits <= n:
        raise EvalInputError(f"splits={splits} must be between 1 and the number of samples ({n})")
    if shuffle:
        x = x[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
    x = x.double()
    p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_i, log_p_i = p[lo:hi], log_p[lo:hi]
        log_marginal = p_i.mean(dim=0, keepdim=True).log()
        terms = p_i * (log_p_i - log_marginal)
        terms = torch.where(p_i > 0, terms, torch.zeros_like(terms))  # 0 * log 0 = 0 (torch-fidelity gives nan)
        kl = terms.sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


# --- precision / recall --------------------------------------------------------------------

def _kth_neighbour_radius(feats: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (k+1-th including itself)."""
    if feats.shape[0] <= k:
        raise EvalInputError(f"k={k} needs more than {k} samples per set, got {feats.shape[0]}")
    radii = []
    for rows in feats.split(block):
        best = None
        for cols in feats.split(block):
            d = torch.cdist(rows, cols)
            d = d if best is None else torch.cat([best, d], dim=1)
            best = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii)


def _inside_any_ball(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> float:
    """Share of `queries` within distance radii[j] of some centre j."""
    hits = []
    for rows in queries.split(block):
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        for cols, r in zip(centres.split(block), radii.split(block)):
            hit |= (torch.cdist(rows, cols) <= r).any(dim=1)
        hits.append(hit)
    return torch.cat(hits).float().mean().item()


def precision_recall(real_feats: torch.Tensor, fake_feats: torch.Tensor, k: int = 3,
                     block: int = 10000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019), as torch-fidelity's prc.

    Precision: share of fake samples inside some real sample's k-NN ball; recall: share of real
    samples inside some fake sample's k-NN ball. Euclidean distances via `torch.cdist` in float32 on
    `block`-sized tiles (torch-fidelity's tiling, default 10000, so results agree exactly).
    Pass Inception pool features (the ADM protocol); note that torch-fidelity 0.4.0's
    `calculate_metrics(prc=True)` defaults to VGG16 features unless `feature_extractor` is given.
    """
    real = torch.as_tensor(real_feats).float()
    fake = torch.as_tensor(fake_feats).float().to(real.device)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise EvalInputError(f"features must be (N, D) with one D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if k < 1:
        raise EvalInputError(f"k={k} must be at least 1")
    precision = _inside_any_ball(fake, real, _kth_neighbour_radius(real, k, block), block)
    recall = _inside_any_ball(real, fake, _kth_neighbour_radius(fake, k, block), block)
    return precision, recall
