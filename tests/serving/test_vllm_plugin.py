"""swaa's vLLM plugin on vLLM's CPU build: a checkpoint with ``config.swaa`` is served exactly as
``swaa.patch_model`` + ``generate`` runs it (greedy tokens identical, log-probs within 1e-5, float32), across
chunked prefill, prefix caching (a later prompt holding an earlier answer included), requests of different
lengths, preemption, tensor parallel 2 and the rule's variants; a checkpoint without it is served bit for bit
as plain vLLM serves it. Each engine runs in a process of its own (tests/serving/serve.py). Skipped without vLLM;
README ("Serving with vLLM") has the command that installs it and runs these."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm")

import swaa  # noqa: E402
from swaa.tiny import tiny_tokenizer  # noqa: E402

SERVE = Path(__file__).with_name("serve.py")
RESULT = "serve.py result: "
ROOT = Path(__file__).resolve().parents[2]
NEW = 24
SWAA_CONFIGS = {
    "fa_decode": dict(window=8, sink=2, interleave=2),  # the paper's recipe, scaled down
    "no_fa_decode": dict(window=6, fa_decode=False),
    "layer_lists": dict(window=5, sink=3, full_attention_layers=[3], fa_decode=[1]),
}


def _ids(count: int, step: int, start: int) -> list[int]:
    return [(i * step + start) % 250 + 3 for i in range(count)]  # byte tokens, never <pad>


BASIC = [_ids(70, 37, 11), _ids(23, 13, 5), _ids(131, 7, 101)]  # three lengths
PREFIX = [BASIC[0], BASIC[0][:64] + BASIC[1], BASIC[0][:64] + BASIC[2][:40]]  # two 32-token blocks in common
PREEMPT = [_ids(60, step, 3) for step in (5, 17, 29)]
FOLLOW_UP = {"answer_of": [0, 0], "then": [7, 8, 9, 10]}  # the first prompt, its answer, a question


def _model(folder: Path, config: dict | None) -> str:
    """A tiny random Qwen3 (head_dim 32: vLLM's CPU backend's smallest) with sharp weights (no near-ties)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.mul_(30.0 if name == "lm_head.weight" else 4.0 if "proj" in name else 1.0)
    if config is not None:
        swaa.patch_model(model, **config)  # saves config.swaa with the checkpoint
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vllm_models")
    return {name: _model(root / name, config) for name, config in [("plain", None), *SWAA_CONFIGS.items()]}


def serve(model: str, rounds: list, llm: dict | None = None, new: int = NEW, env: dict | None = None) -> dict:
    case = dict(model=model, llm=llm or {}, rounds=rounds, new=new)
    done = subprocess.run([sys.executable, str(SERVE), json.dumps(case)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith(RESULT))
    return json.loads(line.removeprefix(RESULT))


@functools.cache
def _patched(model_dir: str):
    """The checkpoint through transformers and swaa.patch_model (its saved config), loaded once per test run."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return swaa.patch_model(model)


def patched_generate(model_dir: str, prompt: list[int], new: int) -> tuple[list[int], list[float]]:
    """The same prompt through the patched checkpoint's greedy generate."""
    from transformers import GenerationConfig

    model = _patched(model_dir)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), output_logits=True, return_dict_in_generate=True,
                         generation_config=GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None,
                                                            pad_token_id=model.config.pad_token_id))
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, [torch.log_softmax(step[0].double(), -1)[t].item() for step, t in zip(out.logits, tokens)]


def assert_served_as_generate(model_dir: str, served: dict, new: int = NEW) -> None:
    for requests in served["rounds"]:
        for request in requests:
            tokens, logprobs = patched_generate(model_dir, request["prompt"], new)
            assert request["tokens"] == tokens, (len(request["prompt"]), request["cached"])
            assert max(abs(a - b) for a, b in zip(request["logprobs"], logprobs)) < 1e-5


def test_defaults_chunked_prefill_and_prefix_caching_with_an_earlier_answer_in_the_prompt(models):
    """vLLM's defaults (chunked prefill, prefix caching). The follow-up prompt holds the first request's answer,
    whose keys were computed as generated tokens (FA decode): the plugin hashes those blocks apart, so they are
    computed again as prompt tokens, while the prompt's own blocks are reused."""
    served = serve(models["fa_decode"], [BASIC, [FOLLOW_UP]], llm=dict(block_size=32), new=40)
    assert_served_as_generate(models["fa_decode"], served, new=40)
    assert served["rounds"][1][0]["cached"] == 64  # the first prompt's two whole blocks, not its answer's


def test_small_prefill_chunks_and_prefix_cache_hits(models):
    served = serve(models["fa_decode"], [PREFIX, PREFIX], llm=dict(block_size=32, max_num_batched_tokens=32,
                                                                 max_num_seqs=4))
    assert_served_as_generate(models["fa_decode"], served)
    assert [r["cached"] for r in served["rounds"][1]] == [64, 64, 96]


def test_without_chunked_prefill_or_prefix_caching(models):
    served = serve(models["fa_decode"], [BASIC], llm=dict(enable_chunked_prefill=False, enable_prefix_caching=False))
    assert_served_as_generate(models["fa_decode"], served)


def test_preempted_requests_recompute_prompt_and_answer_exactly(models):
    """Too few cache blocks for three requests: vLLM preempts one and later recomputes its prompt and generated
    tokens in one chunk, where "still prefilling" would call them all prompt; the prompt lengths do not."""
    served = serve(models["fa_decode"], [PREEMPT], new=40,
                   llm=dict(block_size=32, num_gpu_blocks_override=7, max_model_len=128))
    assert served["preemptions"] > 0
    assert_served_as_generate(models["fa_decode"], served, new=40)


def test_tensor_parallel_2(models):
    served = serve(models["fa_decode"], [PREFIX, PREFIX], env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
                   llm=dict(tensor_parallel_size=2, block_size=32, max_num_batched_tokens=32, max_num_seqs=4))
    assert_served_as_generate(models["fa_decode"], served)


def test_without_fa_decode_an_earlier_answer_is_reused_from_the_cache(models):
    """Without FA decode generated and prompt tokens see the same keys: an answer's blocks are reused as is."""
    served = serve(models["no_fa_decode"], [BASIC, [FOLLOW_UP]], llm=dict(block_size=32), new=40)
    assert_served_as_generate(models["no_fa_decode"], served, new=40)
    assert served["rounds"][1][0]["cached"] == 96  # the prompt's blocks and the answer's


def test_listed_full_layers_and_fa_decode_layers(models):
    served = serve(models["layer_lists"], [BASIC], llm=dict(block_size=32, max_num_batched_tokens=32, max_num_seqs=4))
    assert_served_as_generate(models["layer_lists"], served)


def test_a_checkpoint_without_swaa_is_served_as_plain_vllm_serves_it(models):
    llm = dict(block_size=32, max_num_batched_tokens=32, max_num_seqs=4)
    with_plugin = serve(models["plain"], [PREFIX, PREFIX], llm=llm)
    without = serve(models["plain"], [PREFIX, PREFIX], llm=llm, env={"VLLM_PLUGINS": "none"})
    assert with_plugin == without
    swaa_served = serve(models["fa_decode"], [BASIC], llm=llm, env={"VLLM_PLUGINS": "none"})
    plain_tokens = [r["tokens"] for r in swaa_served["rounds"][0]]  # without the plugin: full attention, silently
    assert plain_tokens != [patched_generate(models["fa_decode"], p, NEW)[0] for p in BASIC]


def test_off_the_cpu_build_a_swaa_checkpoint_is_refused(models, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    from swaa.serving import vllm_adapter

    class GPU:
        @staticmethod
        def is_cpu():
            return False

    args = EngineArgs(model=models["fa_decode"], dtype="float32", enforce_eager=True, max_model_len=512)
    monkeypatch.setattr(vllm_adapter, "current_platform", GPU)
    with pytest.raises(ValueError, match="serves its rule on vLLM's CPU build only"):
        args.create_engine_config()
