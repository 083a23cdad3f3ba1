"""convmaps: open up convolutional networks.

The Python API, imported on first use (`import convmaps` and `convmaps --help` stay fast):

    >>> import convmaps, torch
    >>> lenet = convmaps.load_model("lenet")  # the bundled, trained LeNet-5
    >>> x = torch.rand(1, 1, 28, 28)
    >>> got = convmaps.trace(lenet.model, x, ["C1", "C3"], inputs=["C3"])
    >>> got.outputs["C3"].shape
    torch.Size([1, 16, 10, 10])
    >>> km = convmaps.kernel_maps(lenet.model.C3, got.inputs["C3"][0])  # (C_out, C_in, H, W)
    >>> bool(torch.allclose(km.sum(1) + lenet.model.C3.bias[:, None, None], got.outputs["C3"][0],
    ...                     atol=1e-5))
    True
    >>> convmaps.fields(lenet.model, (1, 28, 28))["C3"].box(0, 0)  # C3 at (0, 0) sees these pixels
    (-2, -2, 12, 12)
    >>> moved = convmaps.invariance(lenet.model, x[0], "rotate", [0.0, 90.0], ["C1", "F6"])
    >>> moved.distance.shape  # (amounts, modules): how far each output moved
    torch.Size([2, 2])
    >>> node = convmaps.explain(lenet.model, x[0], convmaps.Unit("C3", 5, (4, 4)))  # an exact sum
    >>> abs(node.bias + sum(t.value for t in node.terms) - node.value) < 1e-5
    True

Jobs over folders of images run as the CLI runs them, e.g.
`convmaps.run_dump(convmaps.plan_dump(convmaps.DumpOptions("lenet", out="o")))`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that holds it; loaded on first access
_API = {
    "load_model": "convmaps.core.models",
    "trace": "convmaps.core.capture",
    "select": "convmaps.core.capture",
    "layer_table": "convmaps.core.capture",
    "kernel_maps": "convmaps.core.decompose",
    "tap_maps": "convmaps.core.decompose",
    "switches": "convmaps.core.pooling",
    "fields": "convmaps.core.fields",
    "project": "convmaps.core.deconv",
    "Unit": "convmaps.core.deconv",
    "occlude": "convmaps.core.occlusion",
    "invariance": "convmaps.core.invariance",
    "explain": "convmaps.core.explain",
    "DumpOptions": "convmaps.options",
    "TopkOptions": "convmaps.options",
    "ProjectOptions": "convmaps.options",
    "FilterOptions": "convmaps.options",
    "OccludeOptions": "convmaps.options",
    "InvarianceOptions": "convmaps.options",
    "ExplainOptions": "convmaps.options",
    "plan_dump": "convmaps.jobs.dump",
    "run_dump": "convmaps.jobs.dump",
    "plan_topk": "convmaps.jobs.topk",
    "run_topk": "convmaps.jobs.topk",
    "run_project": "convmaps.jobs.project",
    "run_filters": "convmaps.jobs.filters",
    "run_occlude": "convmaps.jobs.occlude",
    "run_invariance": "convmaps.jobs.invariance",
    "run_explain": "convmaps.jobs.explain",
    "build_report": "convmaps.report",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'convmaps' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
