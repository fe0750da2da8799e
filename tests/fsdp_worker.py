"""One rank of tests/test_train.py's FSDP2 check (run by torch.distributed.run, gloo on the CPU, NCCL on GPUs):
a patched model with LoRA, every decoder layer and the whole model sharded with ``fully_shard``, gives the loss
and LoRA gradients of the same model in one process, and the patch still holds, for each family named
(``family+bf16``: sharded with a bfloat16 mixed-precision policy, which casts every layer's forward inputs, as
accelerate's FSDP2 does under ``--bf16``).

How close "the same" is, is measured in the same run: the same model with the same LoRA weights and inputs,
swaa taken off (``unpatched``), goes through the same sharding and policy, and its differences from one process
are the yardstick the patched model's are held to (bf16 rounding depends on the machine's kernels, so no fixed
bound carries between machines). Rank 0 prints every rank's results as one JSON line."""

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
    """The loss, each answer token's loss (the loss is their mean), and the LoRA gradients."""
    output = model(input_ids=ids, attention_mask=mask, labels=labels)
    output.loss.backward()
    shifted = labels[:, 1:]
    token_losses = torch.nn.functional.cross_entropy(
        output.logits[:, :-1].detach().float().transpose(1, 2), shifted, reduction="none")[shifted != -100]
    grads = {name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for name, p in model.named_parameters() if p.requires_grad}
    return float(output.loss), token_losses, grads


def sharded_against_one_process(model, ids, mask, labels, mesh, policy) -> dict:
    """``model`` (sharded in place) against a copy of it in one process: both losses, the largest difference
    of an answer token's loss and of a LoRA gradient, and the largest gradient."""
    one_loss, one_tokens, one_grads = loss_and_lora_grads(copy.deepcopy(model), ids, mask, labels)
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    loss, tokens, grads = loss_and_lora_grads(model, ids, mask, labels)
    assert grads.keys() == one_grads.keys()
    return dict(
        loss=loss, one_process_loss=one_loss, loss_diff=abs(loss - one_loss),
        token_loss_diff=float((tokens - one_tokens).abs().max()),
        max_grad_diff=max(float((grads[n] - one_grads[n]).abs().max()) for n in one_grads),
        max_grad=max(float(grad.abs().max()) for grad in one_grads.values()),
        grads=len(one_grads), patched=swaa.is_patched(model),
    )


def check(name: str, mesh, device: str) -> dict:
    family, _, precision = name.partition("+")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if precision == "bf16" else MixedPrecisionPolicy()
    torch.manual_seed(0)
    model = tiny_model(family).float().to(device)
    swaa.patch_model(model, window=3, sink=1, interleave=2)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"],
                                             init_lora_weights=False))
    unpatched = swaa.unpatch_model(copy.deepcopy(model))  # the yardstick: the same weights and LoRA, no swaa
    ids, mask = left_padded([12, 7], total=12, seed=1)
    ids, mask = ids.to(device), mask.to(device)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :6] = -100  # answers after the prompt: FA decode applies to them
    return dict(family=name, rank=dist.get_rank(),
                patched=sharded_against_one_process(model, ids, mask, labels, mesh, policy),
                unpatched=sharded_against_one_process(unpatched, ids, mask, labels, mesh, policy))


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
