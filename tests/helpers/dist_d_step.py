"""One discriminator step on a fixed global batch; under torchrun each rank takes its share.

    python tests/helpers/dist_d_step.py MODEL_DIR OUT.pt                     (single process)
    torchrun --nproc_per_node 2 tests/helpers/dist_d_step.py MODEL_DIR OUT.pt
Writes D's parameters (flat) before and after the step from rank 0; checks all ranks agree.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from gad_megatron.discriminator import TextEncoder, load_discriminator
from gad_megatron.models.sources import load_tokenizer
from gad_megatron.trainers.discriminator_update import DiscriminatorUpdater

A = [{"role": "user", "content": "Name a colour."}]
B = [{"role": "user", "content": "Name a fruit."}]
PROMPTS = [A, B, A, B, A, B, A, B]
TEACHER = ["Blue.", "An apple.", "Blue.", "An apple.", "Blue.", "An apple.", "Blue.", "An apple."]
ROLLOUTS = ["Red!", "Pear", "green is nice", "a banana split", "Blue", "apple", "I like trains.", "Fruit."]


def main(model_dir: str, out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = load_discriminator(model_dir)
    tok = load_tokenizer(model_dir)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # linear in the gradient: compares the all-reduce itself
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    up = DiscriminatorUpdater(model, tok, TextEncoder(tok, 64, 16), opt, None, micro_batch_size=2, max_grad_norm=0.2)
    share = len(PROMPTS) // world
    rows = slice(rank * share, (rank + 1) * share)
    up.step(PROMPTS[rows], TEACHER[rows], ROLLOUTS[rows], update=True, step=0)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    if world > 1:
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(gathered[0], g) for g in gathered), "ranks disagree after the step"
    if rank == 0:
        torch.save({"before": before, "after": flat}, out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
