"""Quickstart: patch a model with SWAA, generate, check it against full attention, unpatch.

Runs offline on the CPU in seconds with a tiny random Qwen3 model built from a config. With a real model,
replace the model line by ``AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-4B-Instruct-2507")``.
"""

import logging
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import swaa

logging.basicConfig(level=logging.INFO, format="%(message)s")
torch.manual_seed(0)
config = Qwen3Config(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
)
model = Qwen3ForCausalLM(config).eval()
prompt = torch.randint(1, 512, (2, 1000))
attention_mask = torch.ones_like(prompt)
attention_mask[1, :300] = 0  # the second prompt is left padded: 700 real tokens

start = time.perf_counter()
full = model.generate(prompt, attention_mask=attention_mask, max_new_tokens=20, do_sample=False)
full_seconds = time.perf_counter() - start

# The paper's best recipe without fine-tuning: window 2048 (here 128 for a 1000-token prompt), 100 sink
# tokens, odd layers full attention, FA decode on (the default).
swaa.patch_model(model, window=128, sink=100, interleave=2)
print("Which layers use which attention:")
print(swaa.describe(model))
start = time.perf_counter()
patched = model.generate(prompt, attention_mask=attention_mask, max_new_tokens=20, do_sample=False)
patched_seconds = time.perf_counter() - start
print(f"full attention : {full[:, -20:].tolist()[0][:10]} ... ({full_seconds:.2f} s)")
print(f"SWAA           : {patched[:, -20:].tolist()[0][:10]} ... ({patched_seconds:.2f} s)")
print(f"generated tokens equal to full attention: {(patched[:, -20:] == full[:, -20:]).float().mean():.0%}"
      " (random weights: any agreement is luck; the paper measures accuracy on real models)")

swaa.unpatch_model(model)
restored = model.generate(prompt, attention_mask=attention_mask, max_new_tokens=20, do_sample=False)
assert torch.equal(restored, full), "unpatching must give back the original model"
print("unpatched: outputs identical to the original model again")
