"""Synthetic long-context tasks in the spirit of RULER (Hsieh et al., 2024), generated offline and seeded.

Each example is built at a chosen length in tokens of the model's own tokenizer (chat template included):
filler sentences are added around the facts until the prompt reaches the length. Tasks:

- ``needle``: one "special magic number" hidden in the filler; give it back.
- ``multikey``: several magic numbers under different keys; give back the one asked for.
- ``variable_tracking``: a chain ``VAR A = 12345. VAR B = A. ...`` among distractor chains; name every
  variable that holds the value (the gold is a list; the substring scorer wants all of them).

The examples are plain dicts with the fields of ``swaa.eval.data`` (``prompt`` holds ``{context}``); their
lengths are counted on the prompt ``swaa.data.prompt_ids`` builds, as the grid and fine-tuning build it.
"""

from __future__ import annotations

import random

from ..data import prompt_ids

TASKS = ("needle", "multikey", "variable_tracking")

_FILLER = (
    "The grass is green and the sky is blue.",
    "The sun is yellow and the river runs to the sea.",
    "Here we go, there and back again.",
    "A small boat drifted slowly along the quiet canal.",
    "The old library kept its doors open late into the evening.",
    "Bread was baked every morning in the house at the corner.",
    "Clouds gathered over the hills before the afternoon rain.",
    "The market square filled with voices at noon.",
    "A cat slept on the warm stones of the garden wall.",
    "The train left the station a few minutes after eight.",
    "Snow covered the mountain paths for most of the winter.",
    "Children played by the fountain while their parents talked.",
    "The lighthouse turned its lamp toward the dark water.",
    "Apples ripened on the trees behind the farmhouse.",
    "A letter arrived with a stamp from a distant country.",
    "The clock in the tower struck the hour once more.",
)
_ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
               "lucky", "misty", "noble", "odd", "proud", "quiet", "rapid", "silver", "tidy", "vivid", "wild")
_NOUNS = ("anchor", "badger", "candle", "dragon", "falcon", "garden", "harbor", "island", "jacket", "kettle",
          "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "rocket", "saddle", "tunnel", "violin")

_NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them."
               " I will quiz you about the numbers afterwards.")
_VT_INTRO = ("Memorize and track the chain(s) of variable assignment hidden in the following text.")


def _magic_number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _keys(rng: random.Random, count: int) -> list[str]:
    pairs = rng.sample([f"{a}-{n}" for a in _ADJECTIVES for n in _NOUNS], count)
    return pairs


def _variable_names(rng: random.Random, count: int) -> list[str]:
    names: set[str] = set()
    while len(names) < count:
        names.add("".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)))
    return sorted(names, key=lambda _: rng.random())


def _facts(task: str, rng: random.Random, num_keys: int, num_hops: int, num_chains: int):
    """(fact sentences in the order they appear, question, gold answer)."""
    if task in ("needle", "multikey"):
        keys = _keys(rng, 1 if task == "needle" else num_keys)
        values = [_magic_number(rng) for _ in keys]
        facts = [f"One of the special magic numbers for {key} is: {value}." for key, value in zip(keys, values)]
        asked = rng.randrange(len(keys))
        rng.shuffle(facts)
        question = f"What is the special magic number for {keys[asked]} mentioned in the provided text?"
        return facts, question, values[asked]
    names = _variable_names(rng, num_chains * (num_hops + 1))
    values = rng.sample(range(10_000, 99_999), num_chains)
    chains = []
    for chain in range(num_chains):
        chain_names = names[chain * (num_hops + 1) : (chain + 1) * (num_hops + 1)]
        steps = [f"VAR {chain_names[0]} = {values[chain]}."]
        steps += [f"VAR {new} = {old}." for old, new in zip(chain_names, chain_names[1:])]
        chains.append((chain_names, steps))
    facts: list[str] = []
    cursors = [0] * num_chains  # interleave the chains, each in its own order
    while any(cursor < len(steps) for cursor, (_, steps) in zip(cursors, chains)):
        chain = rng.choice([c for c in range(num_chains) if cursors[c] < len(chains[c][1])])
        facts.append(chains[chain][1][cursors[chain]])
        cursors[chain] += 1
    question = (f"Question: Find all variables that are assigned the value {values[0]} in the text above."
                " Answer with their names, separated by spaces.")
    return facts, question, list(chains[0][0])


def _context(rng: random.Random, facts: list[str], num_filler: int) -> str:
    """``num_filler`` filler sentences with the facts at random depths, in their order."""
    filler = [_FILLER[i % len(_FILLER)] for i in rng.sample(range(max(num_filler, 1) * 3), num_filler)]
    slots = sorted(rng.randint(0, num_filler) for _ in facts)
    sentences = list(filler)
    for offset, (slot, fact) in enumerate(zip(slots, facts)):
        sentences.insert(slot + offset, fact)
    return " ".join(sentences)


def synthetic_example(tokenizer, task: str = "needle", length: int = 4096, seed: int = 0, index: int = 0,
                      chat_template: bool | str = "auto", template_kwargs: dict | None = None, num_keys: int = 4,
                      num_hops: int = 4, num_chains: int = 2) -> dict:
    """One example of ``task`` whose formatted prompt has about ``length`` tokens (at most, unless the facts
    alone are longer). Same arguments, same example."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}: unknown; allowed: {', '.join(map(repr, TASKS))}")
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"length={length!r}: must be a positive int (tokens of the prompt)")
    rng = random.Random(f"{seed}/{task}/{index}")
    facts, question, answer = _facts(task, rng, num_keys, num_hops, num_chains)
    intro = _NIAH_INTRO if task != "variable_tracking" else _VT_INTRO
    prompt = f"{intro}\n\n{{context}}\n\n{question}"
    layout_seed = rng.random()

    def tokens_with(num_filler: int) -> tuple[int, str]:
        context = _context(random.Random(layout_seed), facts, num_filler)
        ids = prompt_ids(tokenizer, prompt, context=context, chat_template=chat_template,
                         template_kwargs=template_kwargs)
        return len(ids), context

    # Grow the filler by estimates from the measured tokens per sentence, then step down to fit.
    base, context = tokens_with(0)
    per_sentence = max(1.0, (tokens_with(32)[0] - base) / 32)
    num_filler = max(0, int((length - base) / per_sentence))
    for _ in range(4):
        measured, context = tokens_with(num_filler)
        step = int((length - measured) / per_sentence)
        if step == 0:
            break
        num_filler = max(0, num_filler + step)
    measured, context = tokens_with(num_filler)
    while measured > length and num_filler > 0:
        num_filler -= 1
        measured, context = tokens_with(num_filler)
    return {
        "id": f"{task}-{length}-{seed}-{index}",
        "prompt": prompt,
        "context": context,
        "question": question,
        "question_type": task,
        "answer": answer,
        "target_tokens": length,
    }


def synthetic_dataset(tokenizer, tasks: str | list[str] = "needle", length: int | list[int] = 4096, num: int = 10,
                      seed: int = 0, chat_template: bool | str = "auto", template_kwargs: dict | None = None,
                      progress: bool = False, **task_options) -> list[dict]:
    """``num`` examples of each task at each length (a list of dicts for ``run_grid``), seeded."""
    from tqdm import tqdm

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    lengths = [length] if isinstance(length, int) else list(length)
    if not tasks or not lengths or num < 1:
        raise ValueError(f"tasks={tasks!r}, length={lengths!r}, num={num!r}: need at least one task, length, example")
    jobs = [(task, size, index) for task in tasks for size in lengths for index in range(num)]
    return [
        synthetic_example(tokenizer, task, size, seed, index, chat_template, template_kwargs, **task_options)
        for task, size, index in tqdm(jobs, desc="building synthetic examples", disable=not progress)
    ]
