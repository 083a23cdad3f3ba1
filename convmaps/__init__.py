"""convmaps: open up convolutional networks.

Heavy modules (torch, torchvision) are imported by the submodules that need them, so that
`import convmaps` and `convmaps --help` stay fast.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
