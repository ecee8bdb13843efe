"""Import-time workarounds for third-party packages.

torchvision 0.28.0 (pulled in by the `eval` extra for torch-fidelity) is built against CUDA: on the
CPU build of torch its `_C.so` does not load, yet its `_meta_registrations.py` registers fake
kernels for `torchvision::nms` unconditionally, so `import torchvision` fails, and with it
`import transformers` and `import torch_fidelity`. Defining the two op schemas up front lets those
imports succeed; torchvision's C++ ops (nms, roi_align, ...) stay unavailable.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

_SHIM_LIBRARY: Any = None  # the torch.library.Library holding the shim schemas; must stay alive
_DONE = False


def ensure_torchvision_ops() -> None:
    """Make `import torchvision` work on a CPU torch; a no-op without torchvision or when its ops load."""
    global _SHIM_LIBRARY, _DONE
    if _DONE:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        _DONE = True
        return
    import torch

    library = os.path.join(list(spec.submodule_search_locations)[0], "_C.so")
    try:
        torch.ops.load_library(library)
    except OSError:
        shim = torch.library.Library("torchvision", "DEF")
        shim.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        shim.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        _SHIM_LIBRARY = shim
    _DONE = True
