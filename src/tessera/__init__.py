"""tessera: autoregressive and masked generative modelling on one shared transformer trunk."""
from tessera.compat import ensure_torchvision_ops

ensure_torchvision_ops()  # before anything imports torchvision (see compat.py)
__version__ = "0.1.0"
