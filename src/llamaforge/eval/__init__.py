"""Evaluation: tasks (tasks.py) scored by batched log-likelihood and greedy generation (harness.py).

`run_evaluation(llm, ["arc_easy", ...])` returns {"TASK": {"metric": value, ..., "n": count}};
`llamaforge evaluate` is its command-line form.
"""
from .harness import LM, evaluate, markdown_table, run_evaluation

__all__ = ["LM", "evaluate", "markdown_table", "run_evaluation"]
