from tessera.compat import ensure_torchvision_ops as _ensure_torchvision_ops; _ensure_torchvision_ops()  # noqa: E702
__version__ = "0.1.0"
