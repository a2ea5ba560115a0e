"""Training stages on megatron-core: seqkd, warmup, gad."""
