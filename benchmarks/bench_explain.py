"""One unit's explain tree against one forward pass of the same image, in one run.

    python benchmarks/bench_explain.py [--model alexnet] [--size 224] [--unit features.10:7]
                                       [--depth 3] [--top 3] [--repeats 5]

- forward: one image through the whole model (batch 1, no grad).
- explain: `core.explain.explain` of the unit: the forward pass up to the unit's module (every
           output kept) and the terms of every node of the tree, each conv node from its one
           window (`decompose.window_products`), never whole kernel maps.

Weights are seeded (`weights=None`): speed does not depend on them. Reported: medians, the
tree's node count, and the largest |bias + sum(terms) - value| over its nodes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from convmaps.core.deconv import Unit
from convmaps.core.explain import explain, nodes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="alexnet")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--unit", default="features.10:7")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.get_model(a.model, weights=None).eval()
    image = torch.randn(3, a.size, a.size)
    module, channel = a.unit.split(":")
    unit = Unit(module, int(channel))

    def forward() -> None:
        with torch.no_grad():
            model(image[None])

    runs = {"forward": forward, "explain": lambda: explain(model, image, unit, a.depth, a.top)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(a.repeats):
        for name, run in runs.items():  # alternated, so both see the same machine load
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    tree = nodes(explain(model, image, unit, a.depth, a.top))
    error = max(abs(n.bias + sum(t.value for t in n.terms) - n.value) for n in tree)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{a.model} at {a.size}, unit {a.unit}, depth {a.depth}, top {a.top}: {len(tree)} "
          f"nodes ({sum(n.kind == 'Conv2d' for n in tree)} conv), {torch.get_num_threads()} "
          f"threads, {a.repeats} repeats; largest |bias + sum - value| {error:.1e}")
    for name, t in med.items():
        print(f"  {name:8s} median {t * 1e3:8.1f} ms")
    print(f"  explain / forward: {med['explain'] / med['forward']:.2f}x")


if __name__ == "__main__":
    main()
