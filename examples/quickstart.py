"""Quickstart: patch a model with SWAA, see what changes and what does not, generate, unpatch.

Runs offline on the CPU with a tiny random Qwen3 model built from a config (about 7 s of CPU time). With a real model,
replace the model line by ``AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-4B-Instruct-2507")``. Random
weights say nothing about accuracy (the paper measures that on real models): this shows the mechanics.
"""

import logging

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import swaa

logging.basicConfig(level=logging.INFO, format="%(message)s")  # patch_model logs which layers use which attention
torch.set_num_threads(1)  # tiny ops: more threads only wait on each other (4x the CPU time on a busy machine)
torch.manual_seed(0)
config = Qwen3Config(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
)
model = Qwen3ForCausalLM(config).eval()
prompt = torch.randint(1, 512, (2, 1000))
attention_mask = torch.ones_like(prompt)
attention_mask[1, :300] = 0  # the second prompt is left padded: 700 real tokens
window, sink = 128, 16

with torch.no_grad():
    full_logits = model(prompt, attention_mask=attention_mask).logits
full = model.generate(prompt, attention_mask=attention_mask, max_new_tokens=20, do_sample=False)

# The paper's best recipe without fine-tuning, scaled down: window 2048 -> 128, 100 sinks -> 16, odd layers
# full attention, FA decode on (the default).
swaa.patch_model(model, window=window, sink=sink, interleave=2)  # logs swaa.describe(model): the layer table
with torch.no_grad():
    swaa_logits = model(prompt, attention_mask=attention_mask).logits
# Within the window (plus the sinks) every query sees exactly what full attention sees: same logits.
# Beyond it the SWA layers drop keys: the logits differ.
inside = slice(300, 300 + sink + window)  # row 1's first sink + window real tokens
beyond = slice(300 + sink + window, None)
same = torch.allclose(swaa_logits[1, inside], full_logits[1, inside], atol=1e-5)
differ = (swaa_logits[1, beyond] - full_logits[1, beyond]).abs().max().item()
print(f"prompt tokens within sink + window of the row's start: logits equal to full attention: {same}")
print(f"prompt tokens beyond it: largest logit difference {differ:.3f} (the window at work)")

patched = model.generate(prompt, attention_mask=attention_mask, max_new_tokens=20, do_sample=False)
static = model.generate(prompt, attention_mask=attention_mask, max_new_tokens=20, do_sample=False,
                        cache_implementation="static")
assert torch.equal(static, patched), "the static cache path must generate what the dynamic path generates"
print(f"SWAA generated {patched[:, -20:].tolist()[0][:8]} ...; the static cache path generates the same tokens")

swaa.unpatch_model(model)
restored = model.generate(prompt, attention_mask=attention_mask, max_new_tokens=20, do_sample=False)
assert torch.equal(restored, full), "unpatching must give back the original model"
print("unpatched: outputs identical to the original model again")
