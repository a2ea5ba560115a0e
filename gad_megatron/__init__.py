"""gad: black-box on-policy distillation of LLMs with Generative Adversarial Distillation."""

__version__ = "0.1.0"

import warnings

# megatron-core warns at import that it falls back to torch without Apex / Transformer Engine;
# on CPU that is the design (docs/decisions.md), so one run would print it a dozen times.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed", category=UserWarning)
