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


def _refused_models(folder: Path) -> dict[str, str]:
    """Checkpoints with config.swaa whose attention vLLM would run outside swaa's rule: DeepSeek-V2 (MLA, which
    swaa.patch_model serves exactly) and Mistral with a native sliding window (config.swaa written by hand)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, MistralConfig, MistralForCausalLM

    tokenizer = tiny_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    mla = DeepseekV2ForCausalLM(DeepseekV2Config(**common, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None,
                                                 qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                                                 first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2,
                                                 moe_intermediate_size=64))
    swaa.patch_model(mla, **SWAA_CONFIGS["fa_decode"])
    window = MistralForCausalLM(MistralConfig(**common, num_key_value_heads=2, head_dim=32, sliding_window=16))
    window.config.swaa = swaa.SWAAConfig(**SWAA_CONFIGS["fa_decode"]).to_dict()
    paths = {}
    for name, model in (("mla", mla), ("native_window", window)):
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
        paths[name] = str(folder / name)
    return paths


def case(model: str, rounds: list, llm: dict | None = None, new: int = NEW) -> dict:
    return dict(model=model, llm=llm or {}, rounds=rounds, new=new)


def serve_cases(cases: list[dict], env: dict | None = None) -> list[dict]:
    """The cases' engines one after another in one process of their own (serve.py)."""
    done = subprocess.run([sys.executable, str(SERVE), json.dumps(cases)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line.removeprefix(RESULT)) for line in done.stdout.splitlines() if line.startswith(RESULT)]


def serve(model: str, rounds: list, llm: dict | None = None, new: int = NEW, env: dict | None = None) -> dict:
    served = serve_cases([case(model, rounds, llm, new)], env)[0]
    assert "error" not in served, served["error"]
    return served


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


class _Platform:
    """vLLM's platform as the adapter sees it off the CPU build: CUDA or another."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def is_cpu(self):
        return False

    def is_cuda(self):
        return self.cuda


@pytest.mark.parametrize("cuda", [False, True], ids=["other", "cuda"])
def test_off_the_cpu_build_a_swaa_checkpoint_is_refused_naming_the_gpu_opt_in(models, monkeypatch, cuda):
    from vllm.engine.arg_utils import EngineArgs

    from swaa.serving import vllm_adapter

    monkeypatch.delenv("SWAA_VLLM_GPU", raising=False)
    monkeypatch.setattr(vllm_adapter, "current_platform", _Platform(cuda))
    args = EngineArgs(model=models["fa_decode"], dtype="float32", enforce_eager=True, max_model_len=512)
    with pytest.raises(ValueError, match="on a CUDA build only when you opt in with the environment variable"
                                         " SWAA_VLLM_GPU=1"):
        args.create_engine_config()
    if not cuda:  # the opt-in is for CUDA builds only
        monkeypatch.setenv("SWAA_VLLM_GPU", "1")
        with pytest.raises(ValueError, match="SWAA_VLLM_GPU=1"):
            args.create_engine_config()


def test_gpu_opt_in_warns_at_engine_start_and_registers_the_flash_attention_subclass(models, monkeypatch, caplog):
    """With SWAA_VLLM_GPU=1 on CUDA: one warning at engine start that the engine path is tested on the CPU build
    only, vLLM's FLASH_ATTN backend chosen, and register() puts swaa's subclass of it in vLLM's registry (recorded
    here, not installed: this process serves the CPU tests)."""
    import logging

    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from swaa.serving import vllm_adapter

    monkeypatch.setattr(vllm_adapter, "current_platform", _Platform(cuda=True))
    monkeypatch.setenv("SWAA_VLLM_GPU", "1")
    args = EngineArgs(model=models["fa_decode"], dtype="float32", enforce_eager=True, max_model_len=512)
    with caplog.at_level(logging.WARNING, logger="swaa"):
        config = args.create_engine_config()
    warnings = [r.getMessage() for r in caplog.records if r.name == "swaa" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tested on vLLM's CPU build only" in warnings[0]
    assert config.attention_config.backend == AttentionBackendEnum.FLASH_ATTN
    registered = []
    monkeypatch.setattr(vllm_adapter, "register_backend", lambda *a: registered.append(a))
    monkeypatch.setattr(vllm_adapter, "_wrap_once", lambda *a: None)
    vllm_adapter.register()
    assert registered == [(AttentionBackendEnum.FLASH_ATTN, "swaa.serving.vllm_adapter.SWAAFlashBackend")]
    backend = vllm_adapter.SWAAFlashBackend
    assert backend.get_name() == "FLASH_ATTN" and backend.get_impl_cls() is vllm_adapter.SWAAFlashImpl
    monkeypatch.delenv("SWAA_VLLM_GPU")
    registered.clear()
    vllm_adapter.register()  # without the opt-in no GPU class of vLLM is replaced
    assert registered == []


def test_gpu_backends_swa_attention_over_vllms_flash_cache_layout_equals_the_rule(models):
    """SWAAFlashImpl.forward for an SWA layer, on the CPU: a mixed batch (prefilling, decoding, recomputing a
    preempted request) over a cache in vLLM's FlashAttention layout, (blocks, block_size, kv_heads, key | value),
    handed over as vLLM does as its (blocks, kv_heads, block_size, ...) view, with metadata as SWAAFlashBuilder
    builds it. Full layers run vLLM's CUDA kernel (not here)."""
    from types import SimpleNamespace

    from paged_cases import PagedCase, Request, make_inputs
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs

    from swaa.serving.vllm_adapter import SWAAFlashImpl, SWAAFlashMetadata, _model_rules

    config = EngineArgs(model=models["fa_decode"], dtype="float32", enforce_eager=True,
                        max_model_len=512).create_engine_config()
    layer = next(i for i, rule in enumerate(_model_rules(config)) if not rule.is_full)
    rule = _model_rules(config)[layer]
    assert rule.fa_decode and rule.sink > 0
    case = PagedCase((Request(70, 70, 70), Request(45, 1, 30), Request(100, 37, 100), Request(61, 20, 50)), rule,
                     block_size=16, heads=4, kv_heads=2, head_dim=32)
    inputs, expected, plain = make_inputs(case)
    flash_cache = torch.cat([inputs["key_cache"], inputs["value_cache"]], -1).transpose(1, 2).contiguous()
    with set_current_vllm_config(config):
        impl = SWAAFlashImpl(num_heads=4, head_size=32, scale=32**-0.5, num_kv_heads=2, alibi_slopes=None,
                             sliding_window=None, kv_cache_dtype="auto")
    starts, seq_lens = inputs["query_starts"], inputs["seq_lens"]
    metadata = SWAAFlashMetadata(
        num_actual_tokens=starts[-1], max_query_len=max(b - a for a, b in zip(starts, starts[1:])),
        query_start_loc=torch.tensor(starts, dtype=torch.int32), max_seq_len=max(seq_lens),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_table=inputs["block_table"],
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64), query_starts=starts, seq_lens_list=seq_lens,
        prompt_lens=inputs["prompt_lens"])
    query = inputs["query"]
    output = torch.full((starts[-1] + 3, 4, 32), float("nan"))  # vLLM's padded batch: rows past the tokens untouched
    impl.forward(SimpleNamespace(layer_name=f"model.layers.{layer}.self_attn.attn"), torch.cat([query, query[:3]]),
                 None, None, flash_cache.transpose(1, 2), metadata, output)
    error = lambda out: ((out.double() - expected).norm() / expected.norm()).item()  # noqa: E731
    assert error(output[: starts[-1]]) <= 2 * error(plain) + 1e-7
    assert output[starts[-1]:].isnan().all()


def test_layers_vllm_attends_outside_swaa_are_refused_in_the_users_exception(tmp_path):
    """MLA layers (vLLM's own MLA backend: not one layer runs swaa's attention) and a native sliding window are
    refused while the engine is built, in a worker; the user's exception says why, not only the worker's log."""
    paths = _refused_models(tmp_path)
    mla, window = serve_cases([case(paths["mla"], [BASIC]), case(paths["native_window"], [BASIC])])
    assert mla["error"].startswith("ValueError: this checkpoint's config has swaa for 2 layers"), mla
    assert "MLAAttention" in mla["error"]
    assert window["error"].startswith("ValueError: this checkpoint's config has swaa, and vLLM builds its attention"
                                      " with a native sliding window"), window


@pytest.mark.parametrize("feature", ["alibi_slopes", "logits_soft_cap", "sinks"])
def test_attention_features_swaa_cannot_carry_are_refused(models, feature, tmp_path):
    """vLLM's CPU attention takes alibi, soft-capping and learned sinks, which swaa's attention would drop. The
    refusal is also left where the front end reads it."""
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs

    from swaa.serving.vllm_adapter import REFUSAL_FILE, SWAACPUImpl

    config = EngineArgs(model=models["fa_decode"], dtype="float32", enforce_eager=True,
                        max_model_len=512).create_engine_config()
    setattr(config.model_config.hf_config, REFUSAL_FILE, str(tmp_path / "refusal"))
    value = {"alibi_slopes": [0.5] * 4, "logits_soft_cap": 30.0, "sinks": torch.zeros(4)}[feature]
    arguments = dict(num_heads=4, head_size=32, scale=1.0, num_kv_heads=2, alibi_slopes=None, sliding_window=None,
                     kv_cache_dtype="auto")
    with set_current_vllm_config(config):
        SWAACPUImpl(**arguments)  # without the feature: accepted
        with pytest.raises(ValueError, match="which swaa's rule does not carry") as refusal:
            SWAACPUImpl(**{**arguments, feature: value})
    assert (tmp_path / "refusal").read_text() == str(refusal.value)


def test_prompt_lengths_do_not_turn_on_a_models_own_rswa_layers(models):
    """vLLM hands prompt lengths to attention when rswa_window is set; some model classes (deepseek_v2) build R-SWA
    layers, which free KV blocks, from hf_config.rswa_window: the plugin sets it on the architecture config only."""
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=models["fa_decode"], dtype="float32", enforce_eager=True,
                        max_model_len=512).create_engine_config()
    assert config.model_config.rswa_window is not None
    assert getattr(config.model_config.hf_config, "rswa_window", None) is None


def test_in_process_engines_choose_block_hashing_from_their_own_config(models):
    """Engines in the front end's process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the FA-decode engine with prefix
    caching hashes its answers' blocks apart (exact follow-up), and a plain engine started after it in the same
    process reuses an earlier answer's blocks as plain vLLM does."""
    llm = dict(block_size=32)
    swaa_served, plain_after, plain_alone = serve_cases(
        [case(models["fa_decode"], [BASIC, [FOLLOW_UP]], llm, new=40),
         case(models["plain"], [BASIC, [FOLLOW_UP]], llm, new=40)], env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}) + [
        serve(models["plain"], [BASIC, [FOLLOW_UP]], llm, new=40, env={"VLLM_PLUGINS": "none"})]
    assert_served_as_generate(models["fa_decode"], swaa_served, new=40)
    assert swaa_served["rounds"][1][0]["cached"] == 64  # the prompt's blocks, not the answer's
    tokens_and_hits = [[(r["tokens"], r["cached"]) for r in requests] for requests in plain_alone["rounds"]]
    assert [[(r["tokens"], r["cached"]) for r in requests] for requests in plain_after["rounds"]] == tokens_and_hits
    assert plain_after["rounds"][1][0]["cached"] == 96  # the answer's blocks reused (log-probs: threads differ)


VERSION_MISMATCH = """
import json, logging, sys
import vllm
from vllm.engine.arg_utils import EngineArgs
vllm.__version__ = "0.99.0"  # a vLLM the adapter was not written for
records = []
logging.getLogger("swaa").addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: records.append(r)})())
from swaa.serving import vllm_plugin
vllm_plugin.register()
vllm_plugin.register()  # vLLM may load plugins again
settings = dict(dtype="float32", enforce_eager=True, max_model_len=512)
plain = EngineArgs(model=sys.argv[1], **settings).create_engine_config()
try:
    EngineArgs(model=sys.argv[2], **settings).create_engine_config()
    refusal = None
except ValueError as error:
    refusal = str(error)
print(json.dumps(dict(warnings=[r.getMessage() for r in records], plain=plain.model_config.architecture,
                      refusal=refusal)))
"""


def test_another_vllm_version_leaves_plain_models_to_vllm_and_refuses_swaa_checkpoints(models):
    """The entry point never breaks vLLM: on a version the adapter was not written for, one logged line, nothing
    installed for plain checkpoints, and a swaa checkpoint refused naming the supported versions."""
    from swaa.serving.vllm_plugin import SUPPORTED_VLLM

    done = subprocess.run([sys.executable, "-c", VERSION_MISMATCH, models["plain"], models["fa_decode"]],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "VLLM_PLUGINS": "none"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["warnings"]) == 1 and "vLLM 0.99.0 is installed" in result["warnings"][0]
    assert result["plain"] == "Qwen3ForCausalLM"
    assert result["refusal"] and f"vLLM {SUPPORTED_VLLM[0]}" in result["refusal"]


def teacher_forced_logprobs(model_dir: str, prompt: list[int], tokens: list[int], dtype) -> torch.Tensor:
    """Log-probs of ``tokens`` after ``prompt`` from one forward of the patched checkpoint at ``dtype`` (the answer
    placed by prompt_len: its tokens attend as generated ones), in float64."""
    from transformers import AutoModelForCausalLM

    model = swaa.patch_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval())
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids, prompt_len=torch.tensor([len(prompt)])).logits[0, len(prompt) - 1 : -1].double()
    return logits.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]


def test_the_default_engine_bf16_compiled_is_as_close_as_plain_attention_at_bf16(models):
    """``LLM(path)`` with vLLM's defaults runs bf16 and compiled on the CPU build, where exactness is not the claim:
    its log-probs' error against the float64 rule is at most twice that of the same checkpoint patched in
    transformers at bf16 (the GPU tests' tolerance rule), over the tokens the engine generated."""
    served = serve_cases([case(models["fa_decode"], [BASIC], dict(dtype="auto", enforce_eager=False,
                                                                    max_model_len=1024))])[0]
    assert served.get("dtype") == "torch.bfloat16" and served["compiled"], served.get("error")
    errors = {"served": [], "bf16": []}
    exact = []
    for request in served["rounds"][0]:
        expected = teacher_forced_logprobs(models["fa_decode"], request["prompt"], request["tokens"], torch.float64)
        exact.append(expected)
        errors["served"].append(torch.tensor(request["logprobs"], dtype=torch.float64) - expected)
        errors["bf16"].append(teacher_forced_logprobs(models["fa_decode"], request["prompt"], request["tokens"],
                                                      torch.bfloat16) - expected)
    norm = torch.cat(exact).norm()
    served_error, bf16_error = (torch.cat(errors[k]).norm() / norm for k in ("served", "bf16"))
    assert served_error <= 2 * bf16_error + 1e-3, (served_error, bf16_error)
