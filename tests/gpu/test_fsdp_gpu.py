"""FSDP2 through accelerate on two GPUs: ``examples/finetune_lora.py`` launched with
``examples/accelerate_fsdp2.yaml`` trains as the same script does on one GPU (same global batch), and the
adapter it saves reloads into a patched model that generates what the one-GPU adapter generates."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import swaa
from swaa.train import load_adapter

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (FSDP over two processes)")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "finetune_lora.py")
# float32, so that one GPU and two agree closely; gradient checkpointing as a long-context run uses it
COMMON = ["--tiny", "--max-steps", "4", "--num-examples", "72", "--eval-examples", "8", "--logging-steps", "1",
          "--gradient-checkpointing"]


def finetune(command: list[str], out, **env) -> str:
    result = subprocess.run(command + COMMON + ["--output-dir", str(out)], capture_output=True, text=True,
                            timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, **env})
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def example_module():
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import finetune_lora
    finally:
        sys.path.pop(0)
    return finetune_lora


def tiny_generate(adapter_dir, prompts: list[str]) -> torch.Tensor:
    finetune_lora = example_module()
    tokenizer = finetune_lora.tiny_tokenizer()
    tokenizer.padding_side = "left"
    torch.manual_seed(0)  # the script's --seed: the same random base model
    base = finetune_lora.tiny_model(tokenizer).cuda()
    model = load_adapter(base, adapter_dir)
    assert swaa.get_config(model) == swaa.SWAAConfig(**finetune_lora.TINY_SWAA)
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to("cuda")
    return model.generate(**inputs, max_new_tokens=4, do_sample=False)


def test_fsdp2_through_accelerate_trains_as_one_gpu_and_its_adapter_reloads(tmp_path):
    one, two = tmp_path / "one_gpu", tmp_path / "fsdp2"
    finetune([sys.executable, SCRIPT, "--batch-size", "8"], one, CUDA_VISIBLE_DEVICES="0")
    stdout = finetune([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       os.path.join(ROOT, "examples", "accelerate_fsdp2.yaml"), "--num_processes", "2",
                       "--main_process_port", "29541", SCRIPT, "--batch-size", "4"], two)
    assert "processes: 2 (DistributedType.FSDP)" in stdout
    expected, got = (json.loads((out / "losses.json").read_text()) for out in (one, two))
    assert got["steps"] == expected["steps"] == 4 and len(got["train"]) == 4
    assert got["train"] == pytest.approx(expected["train"], rel=1e-3)
    assert got["start"] == pytest.approx(expected["start"], rel=1e-4)
    assert got["end"] == pytest.approx(expected["end"], rel=1e-3)
    assert got["train"] != pytest.approx([got["start"]] * 4, rel=1e-3)  # the adapter did train

    prompts = [example["prompt"] for example in example_module().key_value_task(8, seed=0)]
    assert torch.equal(tiny_generate(two, prompts), tiny_generate(one, prompts))
