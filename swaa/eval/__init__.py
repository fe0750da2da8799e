"""Quality evaluation: compare SWAA configs with full attention on long-context tasks, offline.

    from swaa.eval import run_grid, synthetic_dataset
    data = synthetic_dataset(tokenizer, ["needle", "variable_tracking"], length=8192, num=20)
    run_grid(model, tokenizer, data, [{"window": 2048, "sink": 100, "interleave": 2}], "out/eval")

or ``python -m swaa.eval --help``. Modules: ``data`` (the fields of an example, length filter, answer
extraction; loading and prompts are ``swaa.data``'s, shared with fine-tuning), ``synthetic`` (RULER-style
tasks), ``scoring`` (scorers, judge hook), ``configs`` (the baseline and config names), ``runner`` (the grid
and its files), ``plot`` (accuracy against time). The runner's names import torch on first use.
"""

from ..data import format_prompt, load_examples
from .configs import FULL_ATTENTION, config_name, parse_configs
from .data import Example, extract_answer, to_examples
from .scoring import SCORERS, choice_match, exact_match, get_scorer, judge_scorer, normalize, substring_match
from .synthetic import TASKS, synthetic_dataset, synthetic_example

_RUNNER_NAMES = ("GridResult", "load_model", "run_grid", "write_results")
__all__ = [
    "FULL_ATTENTION", "SCORERS", "TASKS", "Example", "choice_match", "config_name", "exact_match",
    "extract_answer", "format_prompt", "get_scorer", "judge_scorer", "load_examples", "normalize",
    "parse_configs", "substring_match", "synthetic_dataset", "synthetic_example", "to_examples", *_RUNNER_NAMES,
]


def __getattr__(name: str):
    if name in _RUNNER_NAMES:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'swaa.eval' has no attribute {name!r}")
