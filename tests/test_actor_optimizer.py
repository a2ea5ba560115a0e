"""megatron-core's torch-Adam fallback runs torch's fused kernel: the same update, one pass."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from gad_megatron.trainer.actor import use_fused_torch_adam


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((64, 32), (32,), (7, 5, 3))]


def test_fused_adam_gives_the_unfused_update() -> None:
    plain, fused = _params(), _params()
    opt_plain = torch.optim.AdamW(plain, lr=1e-2, weight_decay=0.01)
    opt_fused = torch.optim.AdamW(fused, lr=1e-2, weight_decay=0.01)
    assert use_fused_torch_adam(SimpleNamespace(optimizer=opt_fused)) == 1  # a MegatronOptimizer's .optimizer
    assert all(g["fused"] is True and g["foreach"] is False for g in opt_fused.param_groups)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for a, b in zip(plain, fused):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        opt_plain.step()
        opt_fused.step()
    for a, b, start in zip(plain, fused, _params()):
        assert not torch.equal(a, start)  # the steps moved the weights
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_only_fresh_torch_adams_are_switched() -> None:
    adam, sgd = torch.optim.Adam(_params(), lr=1e-3), torch.optim.SGD(_params(), lr=1e-3)
    chained = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=adam), SimpleNamespace(optimizer=sgd)])
    assert use_fused_torch_adam(chained) == 1
    assert "fused" not in sgd.param_groups[0] or not sgd.param_groups[0]["fused"]
    stepped = torch.optim.AdamW(_params(), lr=1e-3)
    for p in stepped.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    stepped.step()  # its state exists (step on the unfused path): left as it is
    assert use_fused_torch_adam(SimpleNamespace(optimizer=stepped)) == 0
    assert not stepped.param_groups[0]["fused"]


def test_parameters_off_the_cpu_are_left_alone() -> None:
    meta = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, device="meta"))], lr=1e-3)  # stands in for a GPU: not a CPU tensor
    assert use_fused_torch_adam(SimpleNamespace(optimizer=meta)) == 0
    assert not meta.param_groups[0]["fused"]
