"""Every preset in examples/ loads, and `gad plan` accepts every stage on 1 and 2 nodes of 8 x 80 GiB
(8 x 141 GiB, H200, for the 30B mixture of experts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gad_megatron.config import load_config
from gad_megatron.planner import plan, refusal

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "examples").glob("*/*.yaml"))
PAPER = {"batch_prompts": 256, "num_generations": 8, "temperature": 0.8, "max_response_length": 1536,
         "disc_learning_rate": 1e-6, "max_grad_norm": 0.2, "disc_only_steps": 10}  # fmt: skip
GPU_MEMORY_GIB = {"qwen3-30b-a3b": 141.0}  # H200; 80 (H100) otherwise


def test_the_eight_presets_are_there() -> None:
    names = {p.parent.name for p in PRESETS}
    assert names == {"qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b", "llama-3.2-3b", "llama-3.1-8b", "qwen3-4b", "qwen3-8b",
                     "qwen3-30b-a3b"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.parent.name)
@pytest.mark.parametrize("nodes", [1, 2])
def test_preset_fits(path: Path, nodes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the planner's table of known models, never the network
    for stage in ("seqkd", "warmup", "gad"):
        cfg = load_config(path, [f"train.stage={stage}"])
        assert {k: getattr(cfg.train, k) for k in PAPER} == PAPER
        assert cfg.data.max_prompt_length == 2048 and cfg.train.learning_rate is None  # 5e-6 seqkd, 1e-6 else
        result = plan(cfg, nodes, 8, GPU_MEMORY_GIB.get(path.parent.name, 80.0))
        assert refusal(result, cfg) is None, (stage, nodes)
        assert result.layout.dp * result.layout.tp * result.layout.pp == 8 * nodes
        assert result.layout.ep == cfg.parallel.expert_parallel
        text = path.read_text()
        assert f"sbatch --nodes {nodes} " in text and f"examples/{path.parent.name}/gad.yaml" in text
