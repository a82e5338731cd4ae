"""Training (and evaluating) the default guard; reached through `llamaforge train-guard`.

- `data`: the rows, their held-out split, category labels and topic-grouped folds;
- `recipes`: the members (a head over the bundled SmolLM2's hidden states, a fine-tuned MiniLM) and
  their ensemble;
- `crossval`: held-out figures, the threshold rule and cross-validation;
- `command`: `GuardTrainConfig`, `train()` and the `train-guard` command.

The runtime (`safety.guard`, `safety.head`) imports nothing from here.
"""
