"""SWA-aware fine-tuning: the collators, the generate / teacher-forcing invariant, gradients against the
float64 reference (with and without gradient checkpointing), self-distillation, and the example script."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from reference import _MASKS, layer_masks, positions, reference_model
from tiny import VOCAB, left_padded, tiny_model, word_tokenizer
from transformers import DataCollatorWithFlattening

import swaa
from swaa.train import IGNORE_INDEX, PromptAnswerCollator, self_distill

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = dict(window=3, sink=1, interleave=3)  # FA decode on: the answer boundary matters
NEW = 5
BACKENDS = ["reference", "flash", "flex"]


def patched_for(backend):
    """The tiny model patched with ``backend``: float64 on the CPU; on a GPU bf16 with head_dim 64, which
    FA2 and FlexAttention take (also the trimmed flash-attn build of benchmarks/build_flash_attn.sh)."""
    if backend != "reference" and not torch.cuda.is_available():
        pytest.skip(f"backend={backend!r} needs a CUDA GPU")
    if not torch.cuda.is_available():
        return swaa.patch_model(tiny_model("qwen3"), **FIELDS, backend=backend)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, pad_token_id=0,
                         eos_token_id=None, bos_token_id=None)
    model = Qwen3ForCausalLM(config).to("cuda", torch.bfloat16).eval()
    return swaa.patch_model(model, **FIELDS, backend=backend)


def assert_logits_equal(actual, expected):
    # float64 on the CPU: generate's float32 logits; bf16 on a GPU: decode and prefill kernels round apart
    tolerance = 1e-5 if actual.device.type == "cpu" else 3e-2
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=tolerance, atol=tolerance)


def generate_answers(model, prompts, new=NEW):
    """Greedy answers of a patched model to token-id prompts, with each step's logits: (answers, logits)."""
    total = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), total, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, total - len(prompt) :] = torch.tensor(prompt)
        mask[row, total - len(prompt) :] = 1
    device = model.device
    out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    answers = out.sequences[:, total:].tolist()
    logits = torch.stack(out.logits, 1)  # (batch, new, vocab)
    return answers, logits


def token_examples(prompts, answers):
    return [{"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a} for p, a in zip(prompts, answers)]


PROMPTS = [list(range(3, 14)), list(range(20, 27)), list(range(40, 49))]  # 11, 7 and 9 prompt tokens


# ------------------------------------------------------------------------------------------ collator


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collator_masks_prompt_and_padding(padding_side):
    tokenizer = word_tokenizer()
    tokenizer.padding_side = padding_side
    collate = PromptAnswerCollator(tokenizer, chat_template=False)
    batch = collate([{"prompt": "w3 w4 w5 w6", "answer": "w7 w8"}, {"prompt": "w9", "answer": "w10"}])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = {
        "right": ([[3, 4, 5, 6, 7, 8, eos], [9, 10, eos, pad, pad, pad, pad]],
                  [[-100, -100, -100, -100, 7, 8, eos], [-100, 10, eos, -100, -100, -100, -100]]),
        "left": ([[3, 4, 5, 6, 7, 8, eos], [pad, pad, pad, pad, 9, 10, eos]],
                 [[-100, -100, -100, -100, 7, 8, eos], [-100, -100, -100, -100, -100, 10, eos]]),
    }[padding_side]
    assert batch["input_ids"].tolist() == rows[0]
    assert batch["labels"].tolist() == rows[1]
    real = batch["attention_mask"].bool()
    assert batch["position_ids"][real].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]


def test_collator_cuts_the_middle_of_long_prompts_and_keeps_the_answer():
    collate = PromptAnswerCollator(word_tokenizer(), max_length=6, chat_template=False)
    encoded = collate.encode({"prompt": "w3 w4 w5 w6 w7 w8 w9", "answer": "w20 w21"})
    assert encoded["input_ids"] == [3, 4, 9, 20, 21, 1]  # 3 prompt tokens left: its first 2 and its last
    assert encoded["labels"] == [-100, -100, -100, 20, 21, 1]
    too_long = collate.encode({"prompt": "w3 w4", "answer": "w20 w21 w22 w23 w24 w25 w26"})
    assert too_long["input_ids"] == [3, 20, 21, 22, 23, 24]  # one prompt token stays; the answer's end goes


def test_collator_packs_like_data_collator_with_flattening():
    tokenizer = word_tokenizer()
    examples = [{"prompt": "w3 w4 w5", "answer": "w6"}, {"prompt": "w7 w8", "answer": "w9 w10"}]
    packed = PromptAnswerCollator(tokenizer, packing=True, chat_template=False)(examples)
    assert set(packed) == {"input_ids", "labels", "position_ids"}  # no attention mask: sequences by positions
    assert packed["input_ids"].tolist() == [[3, 4, 5, 6, 1, 7, 8, 9, 10, 1]]
    assert packed["labels"].tolist() == [[-100, -100, -100, 6, 1, -100, -100, 9, 10, 1]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]


def test_chat_template_is_applied_to_the_prompt_only():
    tokenizer = word_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}w50 {{ m['content'] }} w51 {% endfor %}w52"
    encoded = PromptAnswerCollator(tokenizer).encode({"prompt": "w3 w4", "answer": "w5"})
    assert encoded["input_ids"] == [50, 3, 4, 51, 52, 5, 1]
    assert encoded["labels"] == [-100] * 5 + [5, 1]


# ------------------------------------------------------------------ generate equals teacher forcing


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_generate_logits_equal_teacher_forced_collated_batch(backend, padding_side):
    """Each answer token's logits from generate equal one teacher-forced forward over prompt + answer,
    the prompt length given by the collator's -100 labels; batch of 3 with padding."""
    model = patched_for(backend)
    device = model.device
    answers, generated_logits = generate_answers(model, PROMPTS)
    tokenizer = word_tokenizer()
    tokenizer.padding_side = padding_side
    batch = PromptAnswerCollator(tokenizer)(token_examples(PROMPTS, answers))
    forced = model(**{k: v.to(device) for k, v in batch.items()}).logits
    for row, prompt in enumerate(PROMPTS):
        start = 0 if padding_side == "right" else batch["input_ids"].shape[1] - len(prompt) - NEW
        rows = forced[row, start + len(prompt) - 1 : start + len(prompt) - 1 + NEW]
        assert_logits_equal(rows, generated_logits[row])


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences_equal_the_same_sequences_unpacked(backend):
    """Both our packing collator and transformers' DataCollatorWithFlattening: each packed sequence
    gets the logits it gets alone, and the answer boundary is found per sequence (against generate)."""
    model = patched_for(backend)
    device = model.device
    answers, generated_logits = generate_answers(model, PROMPTS)
    examples = token_examples(PROMPTS, answers)
    padded = PromptAnswerCollator(word_tokenizer())(examples)
    unpacked = model(**{k: v.to(device) for k, v in padded.items()}).logits
    for packer in (PromptAnswerCollator(word_tokenizer(), packing=True), DataCollatorWithFlattening()):
        packed_batch = packer(examples)
        packed = model(**{k: v.to(device) for k, v in packed_batch.items()}).logits[0]
        start = 0
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            assert_logits_equal(packed[start : start + length], unpacked[row, :length])
            prompt = len(PROMPTS[row])
            assert_logits_equal(packed[start + prompt - 1 : start + prompt - 1 + NEW], generated_logits[row])
            start += length


def test_the_boundary_matters_here():
    """The invariant test can fail: with every token taken as prompt, the answer logits change."""
    model = swaa.patch_model(tiny_model("qwen3"), **FIELDS)
    answers, generated_logits = generate_answers(model, PROMPTS)
    batch = PromptAnswerCollator(word_tokenizer())(token_examples(PROMPTS, answers))
    batch["labels"][:] = IGNORE_INDEX
    batch["labels"][:, -1] = 1  # answers "start" at the last column: every real token before is prompt
    forced = model(**batch).logits
    prompt = len(PROMPTS[0])
    assert not torch.allclose(forced[0, prompt - 1 + 2 : prompt - 1 + NEW], generated_logits[0, 2:].to(forced.dtype))


# ------------------------------------------------------------------------------------------ backward


def reference_loss_and_grads(ref, batch, generated, fields, packed):
    """Loss and parameter gradients of the float64 reference model under the explicit masks."""
    ref.zero_grad()
    num_layers = ref.config.num_hidden_layers
    if packed:
        position_rows = batch["position_ids"].tolist()
        sequence_ids = [torch.cumsum((batch["position_ids"][0] == 0).long(), 0).tolist()]
        masks = layer_masks(torch.ones_like(batch["input_ids"]), generated, num_layers, fields, sequence_ids, position_rows)
        position_ids = batch["position_ids"]
    else:
        masks = layer_masks(batch["attention_mask"], generated, num_layers, fields)
        position_ids = torch.tensor([[p or 0 for p in positions(row.tolist())] for row in batch["attention_mask"]])
    _MASKS.clear()
    _MASKS.update(masks)
    loss = ref(input_ids=batch["input_ids"], position_ids=position_ids, labels=batch["labels"], use_cache=False).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in ref.named_parameters()}


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("checkpointing", ["off", "reentrant", "non_reentrant"])
def test_gradients_equal_the_float64_reference(checkpointing, packed):
    base = tiny_model("qwen3")
    ref = reference_model(base).train()
    model = swaa.patch_model(base, **FIELDS, backend="reference").train()
    if checkpointing != "off":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    prompts, answers = PROMPTS, [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    batch = PromptAnswerCollator(word_tokenizer(), packing=packed)(token_examples(prompts, answers))
    generated = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    if packed:
        start = 0
        for p, a in zip(prompts, answers):
            generated[0, start + len(p) : start + len(p) + len(a)] = True
            start += len(p) + len(a)
    else:
        for row, (p, a) in enumerate(zip(prompts, answers)):
            generated[row, len(p) : len(p) + len(a)] = True
    loss = model(**batch).loss
    loss.backward()
    expected_loss, expected = reference_loss_and_grads(ref, batch, generated, FIELDS, packed)
    # transformers computes the loss in float32 on both sides: equal to float32 rounding
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=1e-6, atol=1e-6)
    grads = dict(model.named_parameters())
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name].grad, grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert any(g.abs().sum() > 0 for n, g in expected.items() if "k_proj" in n)


# ---------------------------------------------------------------------------------- self-distillation


def test_self_distill_answers_greedily_in_batches_and_writes_jsonl(tmp_path):
    tokenizer = word_tokenizer()
    model = tiny_model("qwen3", dtype=torch.float32)
    prompts = ["w3 w4 w5 w6 w7", {"prompt": "w8 w9", "id": 7}, "w10 w11 w12"]
    path = tmp_path / "distilled.jsonl"
    records = self_distill(model, tokenizer, prompts, path, batch_size=2, max_new_tokens=4, chat_template=False)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    assert records[1]["id"] == 7 and [r["prompt"] for r in records] == ["w3 w4 w5 w6 w7", "w8 w9", "w10 w11 w12"]
    for record in records:
        ids = tokenizer(record["prompt"], return_tensors="pt")["input_ids"]
        alone = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
        assert record["answer"] == tokenizer.decode(alone, skip_special_tokens=True)
    swaa.patch_model(model, window=2)
    with pytest.raises(ValueError, match="call swaa.unpatch_model"):
        self_distill(model, tokenizer, prompts)


# ------------------------------------------------------------------------------------------- scripts


def test_finetune_example_tiny_lowers_the_loss_and_saves_adapter_and_config(tmp_path):
    """--tiny with SWAA options (they win over its defaults) and TrainingArguments fields, dashes or not."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "finetune_lora.py"), "--tiny", "--output-dir", str(out),
         "--max_steps", "6", "--num-examples", "40", "--eval_examples", "16", "--per-device-train-batch-size", "4",
         "--window", "32", "--sink", "2", "--interleave", "0", "--fa_decode", "1,3"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = json.loads((out / "losses.json").read_text())
    assert losses["end"] < losses["start"] and losses["steps"] == 6, losses
    assert {"adapter_config.json", "adapter_model.safetensors", "swaa_config.json"} <= set(os.listdir(out))
    saved = swaa.SWAAConfig.from_json_file(out / "swaa_config.json")
    assert saved == swaa.SWAAConfig(window=32, sink=2, fa_decode=[1, 3])  # no interleave: --interleave 0
    # the reload hint it prints can be followed: --tiny saves its base model beside the adapter
    base_folder = str(out / "base_model")
    assert f"from_pretrained({base_folder!r})" in result.stdout and "swaa.train.load_adapter" in result.stdout
    from transformers import AutoModelForCausalLM

    reloaded = swaa.train.load_adapter(AutoModelForCausalLM.from_pretrained(base_folder), str(out))
    assert swaa.get_config(reloaded) == saved


def finetune_script():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import finetune_lora
    finally:
        sys.path.pop(0)
    return finetune_lora


def test_finetune_example_tiny_defaults_and_the_paper_recipe():
    example = finetune_script()
    script, rest = example.parse_args(["--tiny", "--output_dir", "/tmp/unused", "--sink", "8"])
    assert example.swaa_config(script) == swaa.SWAAConfig(window=64, sink=8, interleave=2)
    assert script.eval_examples == 32 and rest == ["--output_dir", "/tmp/unused"]
    script, rest = example.parse_args(["--model", "m", "--data", "d", "--output_dir", "o", "--bf16"])
    assert example.swaa_config(script) == swaa.SWAAConfig(window=2048, sink=100)
    training = example.training_arguments(script, rest, processes=2, cuda=False, eval_set=False)
    assert (training.learning_rate, training.per_device_train_batch_size, training.num_train_epochs) == (1e-4, 1, 1)
    assert training.gradient_accumulation_steps == 32 and training.bf16  # effective batch 64 over 2 processes


@pytest.mark.parametrize("argv, message", [
    (["--tiny", "--output_dir", "/tmp/unused", "--backend", "flash"], "backend='flash' cannot run on cpu"),
    (["--model", "Qwen/Qwen3-4B", "--data", "x.jsonl", "--output_dir", "/tmp/unused"], "not a local folder"),
    (["--tiny"], "--output_dir is needed"),
    (["--tiny", "--output_dir", "/tmp/unused", "--windw", "8"], "unrecognized arguments: --windw 8"),
    (["--tiny", "--output_dir", "/tmp/unused", "--fa_decode", "1,x"], "--fa_decode='1,x': must be a comma-separated"),
], ids=["flash_on_cpu", "hub_id", "no_output_dir", "typo", "fa_decode"])
def test_finetune_example_refuses_at_once_in_one_line(argv, message):
    """Before any model loads (offline there is no hub: no minutes of retries), one line, no traceback."""
    if "flash" in argv and torch.cuda.is_available():
        pytest.skip("checks a machine without CUDA")
    with pytest.raises(SystemExit) as exit:
        finetune_script().main(argv)
    text = str(exit.value)
    assert message in text and "\n" not in text and text.startswith("finetune_lora.py: ")


def test_train_speed_benchmark_smoke(tmp_path):
    out, profile = tmp_path / "speed.json", tmp_path / "profile.txt"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "train_speed.py"), "--smoke", "--json", str(out),
         "--profile", str(profile)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {row["attention"] for row in rows} >= {"full (sdpa)", "swaa reference"}
    assert all(row["tokens_per_s"] > 0 for row in rows if row["status"] == "ok")
    assert result.stdout.strip().splitlines()[-1].startswith("|")
    assert profile.read_text().count("one step profiled") == len(rows) and "Self CPU" in profile.read_text()


@pytest.mark.parametrize("patched", [False, True], ids=["full", "swaa"])
def test_train_speed_answer_logits_give_the_loss_and_gradients_of_all_logits(patched):
    """The benchmark's default (LM head on the answer only, prompt_len for swaa) trains exactly as the full
    logits with labels do."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import train_speed
    finally:
        sys.path.pop(0)
    model = tiny_model("qwen3")
    if patched:
        swaa.patch_model(model, **FIELDS, backend="reference")
    losses, grads = [], []
    for logits in ["all", "answer"]:
        args = train_speed.parse_args(["--smoke", "--logits", logits])
        model.zero_grad()
        loss = model(**train_speed.step_inputs(args, 40, VOCAB, torch.device("cpu"))).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(losses[0], losses[1])
    for all_logits, answer_logits in zip(*grads):
        torch.testing.assert_close(all_logits, answer_logits)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="two processes need two GPUs on a CUDA machine (NCCL); on a CPU-only machine they use gloo")
def test_finetune_example_runs_under_ddp_with_two_processes(tmp_path):
    """DDP as `accelerate launch` / torchrun start it (gloo on the CPU, NCCL on 2 GPUs): the patched
    PeftModel inside DistributedDataParallel, gradient checkpointing and packing on; rank 0 saves."""
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         os.path.join(ROOT, "examples", "finetune_lora.py"), "--tiny", "--output-dir", str(out), "--max-steps", "2",
         "--num-examples", "24", "--eval-examples", "8", "--per-device-train-batch-size", "2",
         "--gradient-checkpointing", "--packing"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes: 2 (DistributedType.MULTI_" in result.stdout
    assert json.loads((out / "losses.json").read_text())["steps"] == 2
    assert (out / "swaa_config.json").exists() and (out / "adapter_model.safetensors").exists()


def within_the_yardstick(row):
    """The failures of one fsdp_worker.py row: the patched model's sharded-against-one-process differences may
    be at most those of the same model without swaa under the same sharding (the yardstick, measured in the same
    run), 2x for values (each answer token's loss, which bounds the loss, their mean) and 3x for gradients, as
    flash-attn's tests hold a kernel to a reference's rounding; float32's old tolerances are the floor where
    the yardstick is 0."""
    patched, yardstick = row["patched"], row["unpatched"]
    checks = [
        ("answer-token loss", patched["token_loss_diff"], yardstick["token_loss_diff"],
         2 * yardstick["token_loss_diff"] + 1e-6 * patched["one_process_loss"]),
        ("LoRA gradient", patched["max_grad_diff"], yardstick["max_grad_diff"],
         3 * yardstick["max_grad_diff"] + 1e-5),
    ]
    return [f"{row['family']} rank {row['rank']}: {what} difference {value:.3g} > {bound:.3g} "
            f"(yardstick {measured:.3g})" for what, value, measured, bound in checks if not value <= bound]


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="two processes need two GPUs on a CUDA machine (NCCL); on a CPU-only machine they use gloo")
def test_lora_on_a_patched_model_sharded_with_fsdp2_matches_one_process():
    """FSDP2 (``fully_shard`` on every decoder layer and the model) over 2 processes: the patch holds, and the
    loss and LoRA gradients equal those of the same model in one process as closely as the model without swaa
    manages under the same sharding and policy (and differ from full attention's, so swaa's pattern is what
    ran), also under a bfloat16 mixed-precision policy, which rebuilds every layer's forward arguments.
    accelerate's FSDP needs GPUs; this is the same sharding, run directly. bf16's differences depend on the
    machine's kernels (qwen3 without swaa: 5.1% of its largest gradient on AVX2, 4.1% with
    ATEN_CPU_CAPABILITY=default), so no fixed bound carries between machines: the yardstick is measured."""
    families = ["qwen3", "mistral", "llama", "qwen3+bf16", "llama+bf16"]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         os.path.join(ROOT, "tests", "fsdp_worker.py"), *families],
        capture_output=True, text=True, timeout=300, cwd=os.path.join(ROOT, "tests"),
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("[")))
    assert sorted((row["family"], row["rank"]) for row in rows) == sorted((f, r) for f in families for r in (0, 1))
    for row in rows:
        assert row["patched"]["patched"] and not row["unpatched"]["patched"]
        assert row["patched"]["grads"] == row["unpatched"]["grads"] > 0
        assert row["patched"]["loss"] != pytest.approx(row["unpatched"]["one_process_loss"], rel=1e-6)
    failures = [failure for row in rows for failure in within_the_yardstick(row)]
    assert not failures, "\n".join(failures)


def test_fsdp_speed_benchmark_smoke_one_and_two_processes(tmp_path):
    """The 1-GPU against 2-GPU benchmark end to end on CPU processes (gloo, no FSDP): its table and JSON."""
    out = tmp_path / "fsdp.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "fsdp_speed.py"), "--smoke", "--gpus", "1", "2",
         "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert sorted((row["attention"], row["gpus"]) for row in rows) == [("full", 1), ("full", 2), ("swaa", 1), ("swaa", 2)]
    assert all(row["status"] == "ok" and row["tokens_per_s"] > 0 for row in rows)
    assert [row["speedup_vs_1_gpu"] for row in rows if row["gpus"] == 1] == [1.0, 1.0]
    assert result.stdout.strip().splitlines()[-1].startswith("| swaa | 2 |")


def test_the_fsdp2_config_file_is_one_accelerate_reads_as_fsdp2():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(os.path.join(ROOT, "examples", "accelerate_fsdp2.yaml"))
    assert str(config.distributed_type) == "DistributedType.FSDP" and config.num_processes == 2
    assert config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the Trainer then saves a peft adapter
