"""Adapter that runs FoundationVision/LlamaGen's own c2i sampler (`generate()`) for benchmarks.

LlamaGen's code is never copied into this repository. Put the files it needs, unmodified, in
a local folder that git ignores (default `.peers/LlamaGen`, listed in `.git/info/exclude`) and
carry that folder to the GPU machine:

    .peers/LlamaGen/autoregressive/models/gpt.py       (FoundationVision/LlamaGen @ce98ec4)
    .peers/LlamaGen/autoregressive/models/generate.py
    .peers/LlamaGen/utils/drop_path.py                  (gpt.py imports it)
    .peers/LlamaGen/{autoregressive,autoregressive/models,utils}/__init__.py   (empty; added
        so that `utils` resolves to this folder ahead of any other `utils` on sys.path)

LlamaGen facts this adapter relies on (checked against ce98ec4):
- `GPT_models['GPT-L'](vocab_size=, block_size=, num_classes=, cls_token_num=, model_type='c2i')`
  builds a `Transformer`; `initialize_weights` zero-fills the output head, so random-weight
  logits would all be 0 (uniform sampling, and a matrix product over zeros, which can time
  faster than real weights). We re-draw the head N(0, 0.02) like every other linear.
- `generate(model, cond, max_new_tokens, emb_masks=None, cfg_scale=1.0, cfg_interval=-1,
  **sampling_kwargs)` with sampling_kwargs `temperature, top_k, top_p, sample_logits`. CFG
  (cfg_scale > 1) doubles the batch with null class `num_classes`; it calls
  `model.setup_caches(...)` (fresh KV caches) on every call, prefills the class token, then
  decodes max_new_tokens - 1 tokens one at a time inside
  `torch.backends.cuda.sdp_kernel(enable_flash=False, enable_mem_efficient=False, enable_math=True)`.
  It returns (B, max_new_tokens) int32 token ids.
- Compilation, as `autoregressive/sample/sample_c2i.py --compile` (and `sample_c2i_ddp.py`,
  where compile is on by default) does it: the whole model is wrapped,
  `torch.compile(model, mode="reduce-overhead", fullgraph=True)`, and passed to `generate`
  (attribute access such as `setup_caches` passes through the OptimizedModule). That is
  `compile_mode="model"` here. `compile_mode="decode"` instead rebinds the module attribute
  `generate.decode_one_token` to a compiled copy, the gpt-fast way (`decode_n_tokens` looks the
  name up at call time); no LlamaGen script does that, so it is an option, not the default.
- torch 2.11 / 2.13: `torch.backends.cuda.sdp_kernel` still exists but is deprecated
  (FutureWarning, silenced here); it maps onto `torch.nn.attention.sdpa_kernel`. If a later
  torch removes it, `_ensure_sdp_kernel` installs an equivalent shim.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_DIR = ".peers/LlamaGen"
REQUIRED_FILES = ("autoregressive/models/gpt.py", "autoregressive/models/generate.py", "utils/drop_path.py")
COMPILE_MODES = ("model", "decode")


class LlamaGenUnavailable(RuntimeError):
    """LlamaGen's files are not where the adapter was told to look."""


def missing_files(llamagen_dir: str | Path) -> list[str]:
    root = Path(llamagen_dir)
    return [f for f in REQUIRED_FILES if not (root / f).is_file()]


def _ensure_sdp_kernel() -> None:
    """Provide `torch.backends.cuda.sdp_kernel` where a torch release no longer has it."""
    if hasattr(torch.backends.cuda, "sdp_kernel"):
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    @contextlib.contextmanager
    def sdp_kernel(enable_flash=True, enable_math=True, enable_mem_efficient=True, enable_cudnn=True):
        backends = [b for on, b in ((enable_flash, SDPBackend.FLASH_ATTENTION),
                                    (enable_mem_efficient, SDPBackend.EFFICIENT_ATTENTION),
                                    (enable_math, SDPBackend.MATH),
                                    (enable_cudnn, SDPBackend.CUDNN_ATTENTION)) if on]
        with sdpa_kernel(backends):
            yield

    torch.backends.cuda.sdp_kernel = sdp_kernel


def import_llamagen(llamagen_dir: str | Path = DEFAULT_DIR) -> tuple[Any, Any]:
    """Import LlamaGen's `gpt` and `generate` modules from `llamagen_dir` (via sys.path)."""
    root = Path(llamagen_dir).resolve()
    missing = missing_files(root)
    if missing:
        raise LlamaGenUnavailable(
            f"LlamaGen files missing under {root}: {', '.join(missing)}. Copy them (unmodified) from "
            "FoundationVision/LlamaGen @ce98ec4 and carry that folder; see bench/peers/llamagen.py.")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    gpt = importlib.import_module("autoregressive.models.gpt")
    generate = importlib.import_module("autoregressive.models.generate")
    for mod in (gpt, generate, sys.modules["utils.drop_path"]):
        if not Path(mod.__file__).resolve().is_relative_to(root):
            raise LlamaGenUnavailable(f"{mod.__name__} was imported from {mod.__file__}, not from {root}: "
                                      "another package of that name shadows LlamaGen's")
    _ensure_sdp_kernel()
    return gpt, generate


@dataclass
class LlamaGenShape:
    """A LlamaGen c2i model: a named `GPT_models` entry, or explicit small ModelArgs."""

    gpt_model: str | None  # e.g. "GPT-L"; None: build `Transformer(ModelArgs(**model_args))`
    vocab_size: int
    grid_size: int
    num_classes: int
    model_args: dict[str, Any] | None = None  # dim / n_layer / n_head (+ anything ModelArgs takes)

    @property
    def n_tokens(self) -> int:
        return self.grid_size ** 2


class LlamaGenSampler:
    """Builds a random-weight LlamaGen c2i model and samples token grids with its `generate()`."""

    def __init__(self, shape: LlamaGenShape, *, device: str | torch.device, dtype: torch.dtype,
                 cfg_scale: float, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 compile: bool = False, compile_mode: str = "model", llamagen_dir: str | Path = DEFAULT_DIR,
                 seed: int = 0):
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode={compile_mode!r}; choose one of {COMPILE_MODES}")
        self.gpt_module, self.generate_module = import_llamagen(llamagen_dir)
        self.shape = shape
        self.cfg_scale = cfg_scale
        self.sampling_kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, sample_logits=True)
        self.compile, self.compile_mode = compile, compile_mode
        torch.manual_seed(seed)
        common = dict(vocab_size=shape.vocab_size, block_size=shape.n_tokens, num_classes=shape.num_classes,
                      cls_token_num=1, model_type="c2i")
        if shape.gpt_model is not None:
            model = self.gpt_module.GPT_models[shape.gpt_model](**common)
        else:
            model = self.gpt_module.Transformer(self.gpt_module.ModelArgs(**common, **(shape.model_args or {})))
        with torch.no_grad():  # LlamaGen zero-inits its output head; draw it like the other linears
            model.output.weight.normal_(mean=0.0, std=model.config.initializer_range)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self._runner = self.model
        self._decode_eager = self.generate_module.decode_one_token
        if compile and compile_mode == "model":
            # autoregressive/sample/sample_c2i.py --compile
            self._runner = torch.compile(self.model, mode="reduce-overhead", fullgraph=True)
        elif compile and compile_mode == "decode":
            self._decode_compiled = torch.compile(self._decode_eager, mode="reduce-overhead", fullgraph=True)

    @contextlib.contextmanager
    def _decode_binding(self):
        """Point `generate.decode_one_token` at the compiled copy for this call only (decode mode)."""
        if not (self.compile and self.compile_mode == "decode"):
            yield
            return
        self.generate_module.decode_one_token = self._decode_compiled
        try:
            yield
        finally:
            self.generate_module.decode_one_token = self._decode_eager

    def __call__(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B,) class ids on the model's device -> (B, n_tokens) int32 token ids."""
        with warnings.catch_warnings(), self._decode_binding():
            warnings.filterwarnings("ignore", message=r".*sdp_kernel\(\)` is deprecated", category=FutureWarning)
            return self.generate_module.generate(
                self._runner, labels, self.shape.n_tokens, emb_masks=None, cfg_scale=self.cfg_scale,
                **self.sampling_kwargs)
