"""Adam step time on SmolLM2-135M's parameter shapes: torch's default (what megatron-core builds
without Apex/TE) vs the fused kernel the trainer switches to (``use_fused_torch_adam``).

    .venv/bin/python bench/optimizer_step.py            # ~1 min on 2 cores

Both variants step the same random parameters and gradients, alternating, ``--steps`` times
each after one warm-up step; reported: the median seconds per step and the largest parameter
difference after the last step (the two must give the same update to rounding).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from types import SimpleNamespace

import torch

from gad_megatron.trainer.actor import use_fused_torch_adam

# SmolLM2-135M: tied 49,152 x 576 embedding, 30 layers (q, o: 576 x 576; k, v: 192 x 576;
# gate, up, down: 1536 x 576), two norms per layer and a final norm.
LAYERS = 30
SHAPES = [(49152, 576)] + [(576, 576)] * 2 * LAYERS + [(192, 576)] * 2 * LAYERS + [(1536, 576)] * 3 * LAYERS
SHAPES += [(576,)] * (2 * LAYERS + 1)


def make(fused: bool) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02) for shape in SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    if fused:
        use_fused_torch_adam(SimpleNamespace(optimizer=opt))
    opt.step()  # warm-up; creates the state
    return params, opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    variants = {name: make(name == "fused") for name in ("default", "fused")}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.steps):
        for name, (_, opt) in variants.items():
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(variants["default"][0], variants["fused"][0]))
    result = {
        "date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "params_m": round(sum(p.numel() for p in variants["fused"][0]) / 1e6, 1),
        "s_per_step": {name: round(statistics.median(t), 3) for name, t in times.items()},
        "speedup": round(statistics.median(times["default"]) / statistics.median(times["fused"]), 2),
        "max_param_diff": diff,
    }  # fmt: skip
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
