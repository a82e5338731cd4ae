"""The options of `llamaforge pretrain`, `finetune` and `align`: one dataclass per command, the one
home of every default. The CLI expands them into flags (`--seq-len 128`, `--train.lr 3e-4`) and
reads `--config FILE.yaml` onto the same fields (`options.build`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..options import path_field
from .trainer import TrainConfig


@dataclass
class PretrainConfig:
    """Pretraining from scratch (tokenizer training and pretokenizing first when needed).

    text: raw text files; tokenized into `data` when that folder has no meta.json yet
    tokenizer: tokenizer folder/file; trained on `text` with vocab_size when missing (default: output/tokenizer)
    vocab_size: pieces of the tokenizer trained on `text`
    data: pretokenized folder from `llamaforge pretokenize` (default: output/data)
    val_fraction: share of the tokens held out for validation when pretokenizing
    preset: ModelArgs preset to start from (dim, n_layers, n_heads, n_kv_heads override it)
    seq_len: training context length
    output: run folder: checkpoints/, train_log.jsonl, loss_curve.png, the final HF model
    sample_tokens: tokens of sample text printed at the end (0: none)
    license: licence recorded in the written model (e.g. apache-2.0)
    """
    text: list[str] | None = path_field()
    tokenizer: str | None = path_field()
    vocab_size: int = 4096
    data: str | None = path_field()
    val_fraction: float = 0.05
    preset: str = "shakespeare-15m"
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    seq_len: int = 256
    output: str = path_field("runs/pretrain")
    sample_tokens: int = 200
    license: str | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=2000, micro_batch_size=16, lr=1e-3, eval_every=200, save_every=500))


@dataclass
class FinetuneConfig:
    """Fine-tuning a checkpoint on JSONL data: full, LoRA or QLoRA (LoRA over an int8/int4 frozen base).

    model: base checkpoint (Meta/HF folder or .gguf; GGUF weights are dequantized to float32); bundled SmolLM2 when omitted
    data: JSONL records: {"messages"}, {"instruction","input","output"}, {"prompt","completion"} or {"question","answer"}
    method: full, lora or qlora
    output: run folder; holds the final adapter (lora/qlora) or HF model (full) and checkpoints/
    val_data: separate validation JSONL; else val_fraction of data (at most val_max records) is held out
    limit: use only the first N records of data
    seq_len: longest training sequence (longer examples are truncated)
    pack: pack several examples into each sequence
    lora_targets: modules to adapt: q k v o gate up down
    quant: base quantization for qlora
    """
    model: str | None = path_field()
    data: str | None = path_field()
    method: Literal["lora", "qlora", "full"] = "lora"
    output: str | None = path_field()
    val_data: str | None = path_field()
    val_fraction: float = 0.02
    val_max: int = 200
    limit: int | None = None
    seq_len: int = 512
    pack: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    quant: Literal["int8", "int4"] = "int8"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=200, micro_batch_size=4, grad_accum=2, lr=2e-4, warmup_steps=10, eval_every=50, eval_batches=4,
        save_every=100))


@dataclass
class AlignConfig:
    """Aligning a checkpoint: a reward model (`reward`), DPO (`dpo`), rejection-sampling fine-tuning or PPO.

    method: reward (a scalar-head reward model), dpo, rejection-sampling (best of K by --reward, then SFT) or ppo (LoRA policy against --reward)
    model: base checkpoint (Meta/HF folder or .gguf, dequantized to float32); bundled SmolLM2 when omitted
    data: preference JSONL(.gz): {"prompt" or "messages", "chosen", "rejected", optional "margin"}, or HH-RLHF transcripts
    extra_data: more preference JSONL files, added to the train part only (never held out), e.g. borderline pairs that keep a safety tune from refusing safe requests
    output: run folder; holds the final model (reward: HF LlamaForSequenceClassification; dpo: adapter or HF model)
    reward: reward model folder (for methods that need one: rejection-sampling, ppo)
    safety_reward: ppo: a safety reward model folder; with it the reward is Llama 2's piecewise one (eq. 3): this model's score on prompts the default guard flags or where its sigmoid is below safety_threshold, else --reward's (helpfulness)
    safety_threshold: ppo: the piecewise reward's threshold on the safety model's sigmoid score (the paper's 0.15)
    max_steps: optimiser steps (a shortcut for train.max_steps)
    held_out: share of the pairs held out by a fixed-seed split (never trained on; validation)
    split_seed: seed of the held-out split (independent of train.seed)
    limit: use only the first N records of data
    seq_len: longest conversation in tokens (longer pairs are left out)
    tune: lora (adapters on a frozen base; the reward head is trained too) or full
    beta: DPO's β (strength of the pull towards the reference)
    loss_type: DPO loss: sigmoid (DPO) or ipo
    label_smoothing: DPO label smoothing ε (conservative DPO; 0 = plain)
    precompute_ref: DPO: compute the reference log-probs once before training (else per step)
    k: rejection sampling: answers sampled per prompt (per turn with ghost_attention); the reward model keeps the best
    temperature: rejection sampling and ppo: sampling temperature
    top_p: rejection sampling: nucleus sampling threshold (1: off)
    max_new_tokens: rejection sampling and ppo: longest sampled answer in tokens
    sample_seed: rejection sampling: seed of every answer's sampler (with the prompt and sample number)
    gen_batch: rejection sampling: sequences decoded together (prompts per batch = gen_batch // k)
    num_prompts: rejection sampling and ppo: use only the first N prompts of the train split
    sample_only: rejection sampling: write OUTPUT/samples.jsonl and stop (no fine-tuning)
    ghost_attention: rejection sampling: build Ghost Attention multi-turn data (instruction on every user turn while sampling, kept on the first only; loss on the last reply only)
    gatt_turns: ghost attention: user turns per dialogue (dialogues with fewer than 2 are left out)
    gatt_instructions: ghost attention: instructions to attach (default: rejection.GATT_INSTRUCTIONS)
    kl_coef: ppo: β of the reward's KL penalty, score - β·(log π - log π_ref) per token
    ppo_epochs: ppo: optimiser steps on each rollout (a rollout is one global batch of prompts)
    ppo_samples: ppo: answers sampled per prompt in a rollout; above 1, each answer's score has the mean of its siblings' scores subtracted (RLOO's leave-one-out baseline: the reward says how much better than the prompt's other answers, not how easy the prompt is)
    gamma: ppo: GAE discount
    lam: ppo: GAE λ
    cliprange: ppo: ε of the clipped ratio (and of the value clipping)
    vf_coef: ppo: weight of the value loss
    """
    method: Literal["reward", "dpo", "rejection-sampling", "ppo"] = "dpo"
    model: str | None = path_field()
    data: str | None = path_field()
    extra_data: list[str] | None = path_field()
    output: str | None = path_field()
    reward: str | None = path_field()
    safety_reward: str | None = path_field()
    safety_threshold: float = 0.15
    max_steps: int | None = None
    held_out: float = 0.1
    split_seed: int = 0
    limit: int | None = None
    seq_len: int = 512
    tune: Literal["lora", "full"] = "lora"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0
    precompute_ref: bool = False
    k: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    sample_seed: int = 0
    gen_batch: int = 16
    num_prompts: int | None = None
    sample_only: bool = False
    ghost_attention: bool = False
    gatt_turns: int = 3
    gatt_instructions: list[str] | None = None
    kl_coef: float = 0.05
    ppo_epochs: int = 2
    ppo_samples: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    vf_coef: float = 0.1
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=200, micro_batch_size=4, grad_accum=2, lr=5e-5, warmup_steps=10, weight_decay=0.0,
        eval_every=50, eval_batches=64, save_every=100))
