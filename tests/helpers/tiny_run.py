"""Build a tiny training setup (data + config) for integration tests."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

TOPICS = ["rain", "tea", "bikes", "maps", "owls", "jazz", "salt", "kites"]


def write_tiny_setup(root: Path, model_dir: Path, n_prompts: int = 8, teacher_repeats: int = 1, **train: object) -> Path:
    """Prompts with teacher responses (the 12-token answer said ``teacher_repeats`` times) and a
    YAML config for ``model_dir``; returns the config path."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data.jsonl"
    with data.open("w") as fh:
        for i in range(n_prompts):
            topic = TOPICS[i % len(TOPICS)]
            fh.write(json.dumps({
                "id": f"p{i}",
                "prompt": [{"role": "user", "content": f"Tell me one fact about {topic}."}],
                "teacher_response": " ".join([f"In short: {topic} is interesting. Hope this helps!"] * teacher_repeats),
            }) + "\n")
    config = {
        "run_dir": str(root / "run"),
        "seed": 1,
        "student": str(model_dir),
        "data": {"path": str(data), "max_prompt_length": 128},
        "train": {
            "batch_prompts": 2, "num_generations": 2, "max_response_length": 12,
            "max_steps": 3, "save_steps": 2, "disc_only_steps": 1, "report_to": [],
            "learning_rate": 1e-4, "disc_learning_rate": 1e-4, **train,
        },
        # exact fp32 on CPU; a micro-batch holds two of the longest sequences (128 + 12 tokens)
        "parallel": {"precision": "fp32", "micro_batch_tokens": 280},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
