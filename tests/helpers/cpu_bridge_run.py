"""Train a tiny megatron-core GPT on CPU with Megatron DDP, an optimizer and grad clipping.

    torchrun --nproc_per_node 2 tests/helpers/cpu_bridge_run.py OUT.json --tp 2 --pp 1 --distributed-optimizer
    python tests/helpers/cpu_bridge_run.py OUT.json --tp 1 --pp 1

The same global batch and, at any TP, the same initial weights (built at full size from one
seed and split): losses and grad norms must agree between TP=1 and TP=2. With ``--named-init`` every
weight matrix is drawn from a seed of its global name instead (layer index counted across pipeline
stages, the last stage's tied output layer drawn as the embedding), so PP=1 and PP=2 start equal too.
Rank 0 writes {"losses": [...], "grad_norms": [...], "bridged": [...]}.
"""

from __future__ import annotations

import argparse
import json
import re
import zlib

import torch


def tiny_config(tp: int, pp: int) -> object:
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, use_cpu_initialization=True, params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
    )  # fmt: skip


def init_by_global_name(model: torch.nn.Module, layer_offset: int) -> None:
    """Redraw every weight matrix from a seed of its layout-independent name (norm weights stay 1)."""

    def global_name(name: str) -> str:
        if name == "output_layer.weight":  # the tied copy on the last pipeline stage
            return "embedding.word_embeddings.weight"
        return re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{int(m[1]) + layer_offset}.", name)

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                seed = zlib.crc32(global_name(name).encode())
                param.copy_(0.02 * torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--named-init", action="store_true", help="layout-independent weights (TP=1 only)")
    args = parser.parse_args()

    from gad_megatron.parallel.launch import init_distributed

    init_distributed(args.tp, args.pp, seed=1)
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from gad_megatron.parallel.cpu import bridged_modules

    config = tiny_config(args.tp, args.pp)
    # use_cpu_initialization draws each layer's full master weight from the CPU generator and
    # keeps this rank's slice, so TP=1 and TP=2 start from the same model (PP stages do not).
    torch.manual_seed(1234)
    model = GPTModel(
        config, get_gpt_layer_local_spec(), vocab_size=256, max_sequence_length=64,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
    )  # fmt: skip
    if args.named_init:
        assert args.tp == 1, "--named-init draws whole matrices: TP must be 1"
        init_by_global_name(model, ps.get_pipeline_model_parallel_rank() * config.num_layers // args.pp)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=args.distributed_optimizer), model
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=0.2, use_distributed_optimizer=args.distributed_optimizer),
        [ddp],
    )
    tokens_BT = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    position_ids_BT = torch.arange(16).expand(4, -1)
    micro_batches = [tokens_BT[:2], tokens_BT[2:]]

    def forward_step(data: object, module: torch.nn.Module) -> tuple[torch.Tensor, object]:
        tokens = next(data)
        out = module(tokens, position_ids_BT[:2], None, labels=tokens)

        def loss_func(per_token_loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            loss = per_token_loss.float().mean()
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    losses, grad_norms = [], []
    for _ in range(3):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[ddp], num_microbatches=2,
            seq_length=16, micro_batch_size=2, forward_only=False,
        )  # fmt: skip
        _, grad_norm, _ = optimizer.step()
        loss = torch.tensor(sum(r["loss"].item() for r in reduced) / 2 if reduced else 0.0)
        torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.MAX)  # the last stage has it
        losses.append(loss.item())
        grad_norms.append(grad_norm)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as fh:
            json.dump({"losses": losses, "grad_norms": grad_norms, "bridged": bridged_modules()}, fh)


if __name__ == "__main__":
    main()
