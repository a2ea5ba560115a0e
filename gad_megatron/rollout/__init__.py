"""Rollouts: the inference-engine interface, its engines (transformers, vLLM) and the weight stream."""
