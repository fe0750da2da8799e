"""Quality evaluation: compare SWAA configs with full attention on long-context tasks, offline.

    from swaa.eval import run_grid, synthetic_dataset
    data = synthetic_dataset(tokenizer, ["needle", "variable_tracking"], length=8192, num=20)
    run_grid(model, tokenizer, data, [{"window": 2048, "sink": 100, "interleave": 2}], "out/eval")

or ``python -m swaa.eval --help``. Modules: ``data`` (loading, chat template, length filter, answer
extraction), ``synthetic`` (RULER-style tasks), ``scoring`` (scorers, judge hook), ``configs`` (config
lists), ``runner`` (the grid and its files), ``plot`` (accuracy against time).
"""

from .configs import FULL_ATTENTION, config_name, parse_configs
from .data import Example, extract_answer, format_prompt, load_examples
from .runner import GridResult, load_model, run_grid, write_results
from .scoring import SCORERS, choice_match, exact_match, get_scorer, judge_scorer, normalize, substring_match
from .synthetic import TASKS, synthetic_dataset, synthetic_example

__all__ = [
    "FULL_ATTENTION", "SCORERS", "TASKS", "Example", "GridResult", "choice_match", "config_name", "exact_match",
    "extract_answer", "format_prompt", "get_scorer", "judge_scorer", "load_examples", "load_model", "normalize",
    "parse_configs", "run_grid", "substring_match", "synthetic_dataset", "synthetic_example", "write_results",
]
