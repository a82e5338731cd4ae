"""The options of `llamaforge pretrain` and `llamaforge finetune`: one dataclass per command, the one
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
