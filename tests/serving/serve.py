"""vLLM engines in a process of their own, for tests/serving: greedy generation of token-id prompts.

    python serve.py '{"model": DIR, "llm": {...LLM kwargs...}, "rounds": [[prompt, ...], ...], "new": 24}'
    python serve.py '[case, case, ...]'     # engines one after another in this process

A round may name earlier outputs: a prompt given as {"answer_of": [round, index], "then": [ids]} is that
prompt followed by its answer and ``then``. Prints one JSON line per case: per round, each request's tokens, their
log-probs and cached tokens; the engine's preemptions, dtype and whether it compiles; or, where the engine failed
to start, the exception's
type and text as the user sees them (on lines that start with "serve.py result: ")."""

from __future__ import annotations

import gc
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
RESULT = "serve.py result: "  # vLLM logs to stdout too


def main() -> None:
    cases = json.loads(sys.argv[1])
    for case in cases if isinstance(cases, list) else [cases]:
        print(RESULT + json.dumps(serve(case)), flush=True)
        gc.collect()


def serve(case: dict) -> dict:
    from vllm import LLM, SamplingParams

    settings = dict(dtype="float32", enforce_eager=True, max_model_len=512, seed=0, disable_log_stats=False)
    try:
        llm = LLM(model=case["model"], **{**settings, **case.get("llm", {})})
    except Exception as error:  # noqa: BLE001 - the refusal tests read what the user would see
        return dict(error=f"{type(error).__name__}: {error}")
    params = SamplingParams(temperature=0.0, max_tokens=case.get("new", 24), logprobs=0, ignore_eos=True)
    rounds = []
    for prompts in case["rounds"]:
        prompts = [p if isinstance(p, list) else _follow_up(rounds, p) for p in prompts]
        results = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        rounds.append([dict(prompt=p, tokens=list(r.outputs[0].token_ids), cached=r.num_cached_tokens,
                            logprobs=[lp[t].logprob for lp, t in zip(r.outputs[0].logprobs, r.outputs[0].token_ids)])
                       for p, r in zip(prompts, results)])
    preemptions = sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    model_config = llm.llm_engine.model_config
    llm.llm_engine.engine_core.shutdown()
    del llm
    return dict(rounds=rounds, preemptions=preemptions, dtype=str(model_config.dtype),
                compiled=not model_config.enforce_eager)


def _follow_up(rounds, spec) -> list[int]:
    earlier = rounds[spec["answer_of"][0]][spec["answer_of"][1]]
    return earlier["prompt"] + earlier["tokens"] + spec["then"]


if __name__ == "__main__":
    main()
