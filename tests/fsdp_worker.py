"""One rank of tests/test_train.py's FSDP2 check (run by torch.distributed.run, gloo on the CPU, NCCL on GPUs):
a patched model with LoRA, every decoder layer and the whole model sharded with ``fully_shard``, gives the loss
and LoRA gradients of the same model in one process, and the patch still holds, for each family named
(``family+bf16``: sharded with a bfloat16 mixed-precision policy, which casts every layer's forward inputs, as
accelerate's FSDP2 does under ``--bf16``). Rank 0 prints every rank's results as one JSON line."""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from tiny import left_padded, tiny_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import swaa


def loss_and_lora_grads(model, ids, mask, labels):
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = {name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def check(name: str, mesh, device: str) -> dict:
    family, _, precision = name.partition("+")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if precision == "bf16" else MixedPrecisionPolicy()
    torch.manual_seed(0)
    model = tiny_model(family).float().to(device)
    swaa.patch_model(model, window=3, sink=1, interleave=2)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"],
                                             init_lora_weights=False))
    ids, mask = left_padded([12, 7], total=12, seed=1)
    ids, mask = ids.to(device), mask.to(device)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :6] = -100  # answers after the prompt: FA decode applies to them
    one_process = loss_and_lora_grads(copy.deepcopy(model), ids, mask, labels)
    unpatched = swaa.unpatch_model(copy.deepcopy(model.get_base_model()))
    full_attention = unpatched(input_ids=ids, attention_mask=mask, labels=labels).loss.detach()
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    sharded = loss_and_lora_grads(model, ids, mask, labels)
    return dict(
        family=name, rank=dist.get_rank(), patched=swaa.is_patched(model), loss=float(sharded[0]),
        one_process_loss=float(one_process[0]), full_attention_loss=float(full_attention),
        max_grad_diff=max(float((sharded[1][n] - one_process[1][n]).abs().max()) for n in one_process[1]),
        max_grad=max(float(grad.abs().max()) for grad in one_process[1].values()),
        grads=len(one_process[1]),
    )


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(dist.get_rank())
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    results = [check(family, mesh, device) for family in sys.argv[1:]]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)  # rank 0 reports every rank: one writer, no interleaved lines
    if dist.get_rank() == 0:
        print(json.dumps([row for rows in gathered for row in rows]), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    # every result is out; leave without C++ static destructors, where gloo's threads at times abort the
    # process ("terminate called without an active exception") after all the work is done
    os._exit(0)


if __name__ == "__main__":
    main()
