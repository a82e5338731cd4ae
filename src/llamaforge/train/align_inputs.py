"""What every `align` method starts from: the trainer settings, the fixed-seed split of the preference
pairs (the held-out part is never trained on or sampled from) and the base model with its chat format."""
from __future__ import annotations

from dataclasses import replace

from .commands import load_base
from .pairs import read_preference_jsonl, split_held_out


def train_config(opts):
    """opts.train with the output folder and the --max-steps shortcut applied."""
    return replace(opts.train, output=str(opts.output),
                   max_steps=int(opts.max_steps) if opts.max_steps is not None else opts.train.max_steps)


def split_and_base(opts):
    """(train pairs, held-out pairs, model, checkpoint, chat template, seq_len) of an AlignConfig; the
    extra_data files' pairs join the train part."""
    pairs = read_preference_jsonl(opts.data, limit=opts.limit)
    train_p, held_p = split_held_out(pairs, float(opts.held_out), int(opts.split_seed))
    for path in opts.extra_data or []:
        train_p += read_preference_jsonl(path)
    model, ckpt = load_base(opts.model)
    template = ckpt.chat_template or getattr(ckpt.tokenizer, "chat_template", None)
    seq_len = int(opts.seq_len)
    if seq_len > model.args.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context window {model.args.max_seq_len}")
    return train_p, held_p, model, ckpt, template, seq_len


def data_files(opts, note: str = "") -> list[dict]:
    """The model card's data_files entries of an AlignConfig: data with its split, then extra_data."""
    split = f"{1 - opts.held_out:.0%} train / {opts.held_out:.0%} held out (seed {opts.split_seed}){note}"
    return [{"path": str(opts.data), "role": "tune", "split": split}] + [
        {"path": str(p), "role": "tune", "split": "train only"} for p in opts.extra_data or []]
