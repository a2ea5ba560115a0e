"""The TRL methods GADTrainer wraps keep the signatures this project was written against.

If the pinned TRL changes, this fails first, pointing at what to re-check in gad/trainers/gad.py.
"""

from __future__ import annotations

import inspect

import trl
from trl import GRPOTrainer, SFTTrainer

EXPECTED = {
    "_generate_and_score_completions": ["self", "inputs"],
    "training_step": ["self", "model", "inputs", "num_items_in_batch"],
    "compute_loss": ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
    "_save_checkpoint": ["self", "model", "trial"],
    "_load_optimizer_and_scheduler": ["self", "checkpoint"],
    "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
}


def test_pinned_minor_version() -> None:
    assert trl.__version__.startswith("1.16."), trl.__version__


def test_wrapped_method_signatures() -> None:
    for name, params in EXPECTED.items():
        assert list(inspect.signature(getattr(GRPOTrainer, name)).parameters) == params, name
    assert list(inspect.signature(SFTTrainer._save_checkpoint).parameters) == ["self", "model", "trial"]


def test_reward_kwargs_include_dataset_columns_and_state() -> None:
    """Our reward reads teacher_response (a dataset column), trainer_state and log_metric."""
    src = inspect.getsource(GRPOTrainer._calculate_rewards)
    for needle in ('reward_kwargs["trainer_state"]', 'reward_kwargs["log_metric"]', "gather(rewards_per_func)"):
        assert needle in src, needle
    assert GRPOTrainer.loss_is_scaled_for_ga is True  # warmup's SFT loss normalises itself like dapo
