"""An independent reference of the SWAA rules (docs/rules.md) for the tests: plain loops, float64, an
explicit mask per layer, no cache. It imports nothing from swaa, so a bug there cannot hide here."""

from __future__ import annotations

import copy

import torch
from transformers import AttentionInterface

_MASKS: dict[int, torch.Tensor] = {}  # layer index -> (batch, q_len, kv_len) bool, for one reference forward


def full_layers(num_layers, *, interleave=None, interleave_offset=1, full_attention_layers=None, **_):
    """Layers that keep full attention, straight from the definition."""
    if interleave is not None:
        return {layer for layer in range(num_layers) if layer >= interleave_offset and (layer - interleave_offset) % interleave == 0}
    return {layer for layer in (full_attention_layers or []) if layer < num_layers}


def sees(i, j, *, generated, full, window, sink, fa_decode):
    """The rule table: may the query at position i see the key at position j (both real tokens)?"""
    if j > i:
        return False
    if full or (fa_decode and generated):
        return True
    return i - j < window or j < sink


def positions(mask_row):
    """Real-token position of every slot of a row (None for padding)."""
    out, count = [], 0
    for real in mask_row:
        out.append(count if real else None)
        count += int(bool(real))
    return out


def layer_masks(attention_mask, generated, num_layers, fields, sequence_ids=None, position_rows=None):
    """Per-layer (batch, L, L) masks. attention_mask: (batch, L) 0/1; generated: (batch, L) bool;
    sequence_ids / position_rows: packed sequences (ids and restarting positions), optional."""
    batch, length = attention_mask.shape
    full = full_layers(num_layers, **fields)
    fa_decode = fields.get("fa_decode", True)
    masks = {}
    for layer in range(num_layers):
        decode = fa_decode if isinstance(fa_decode, bool) else layer in fa_decode
        mask = torch.zeros(batch, length, length, dtype=torch.bool)
        for b in range(batch):
            pos = positions(attention_mask[b].tolist()) if position_rows is None else position_rows[b]
            for q in range(length):
                for k in range(length):
                    if pos[q] is None or pos[k] is None or k > q:
                        continue
                    if sequence_ids is not None and sequence_ids[b][q] != sequence_ids[b][k]:
                        continue
                    mask[b, q, k] = sees(
                        pos[q], pos[k], generated=bool(generated[b, q]), full=layer in full,
                        window=fields["window"], sink=fields.get("sink", 0), fa_decode=decode,
                    )
        masks[layer] = mask
    return masks


def attention(query, key, value, mask, scaling, dtype=torch.float64):
    """Plain softmax attention over an explicit mask; rows that see nothing give 0. Products in ``dtype``
    (float64: the reference; a kernel's low precision: the rounding plain attention has there), softmax in at
    least float32. query: (batch, heads, q, d); key/value: (batch, kv_heads, k, d); mask: (batch, q, k) bool."""
    groups = query.shape[1] // key.shape[1]
    key = key.to(dtype).repeat_interleave(groups, 1)
    value = value.to(dtype).repeat_interleave(groups, 1)
    scores = (query.to(dtype) @ key.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    weights = torch.nan_to_num(scores.softmax(-1, dtype=torch.promote_types(dtype, torch.float32)), nan=0.0).to(dtype)
    return weights @ value, weights


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    output, weights = attention(query, key, value, _MASKS[module.layer_idx], scaling)
    return output.transpose(1, 2).contiguous().to(query.dtype), weights.to(query.dtype)


AttentionInterface.register("swaa_test_reference", _reference_attention)


def reference_model(model):
    """A float64 copy of an unpatched model that attends through the reference."""
    copy_ = copy.deepcopy(model).double().eval()
    copy_.config._attn_implementation_internal = "swaa_test_reference"
    return copy_


def logits(ref_model, input_ids, attention_mask, generated, fields, sequence_ids=None, position_rows=None,
           rope_position_ids=None):
    """Teacher-forced logits (float64) of the whole sequence under the rules, no cache. The model's position ids
    are the rule's positions unless ``rope_position_ids`` are given (a chunk of a document at its offset)."""
    num_layers = ref_model.config.num_hidden_layers
    _MASKS.clear()
    _MASKS.update(layer_masks(attention_mask, generated, num_layers, fields, sequence_ids, position_rows))
    if rope_position_ids is not None:
        position_ids = rope_position_ids
    elif position_rows is None:
        position_ids = torch.tensor([[p or 0 for p in positions(row.tolist())] for row in attention_mask])
    else:
        position_ids = torch.tensor(position_rows)
    with torch.no_grad():
        return ref_model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
