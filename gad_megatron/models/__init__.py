"""Models: where weights come from (``sources``), HF <-> Megatron mapping tables (``families``),
the Megatron policy and discriminator."""
