"""Process groups and launch (torchrun or SLURM), and megatron-core on CPU."""
