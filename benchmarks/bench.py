"""Speed and memory of SWAA against full attention, in one run: ``python benchmarks/bench.py``.

A Qwen3-4B-shaped model with random weights built from its config (no download), bf16, batch 1. Tables:
the attention kernels alone (time, effective TFLOP/s counted over the pairs the mask keeps, decode
bandwidth); the whole model's time to first token and peak GPU memory for full attention and four SWAA
configs; decoding (``--decode``): time per output token of ``generate`` at each context length for every
path a user could take (unpatched eager, unpatched static cache + compiled decode, transformers' native
sliding window static + compiled, each SWAA config eager and static + compiled), beside its floor (bytes of
weights and of the keys and values a token may see, over the copy bandwidth measured in the same run); and
end to end (``--e2e``): the total time of ``generate`` for a long prompt and many new tokens; a batch job
(``--batched``): tokens per second over many left-padded prompts, each path at the largest batch that fits. Prints
markdown last, writes JSON and a PNG plot. ``--smoke`` runs a tiny model on the CPU in seconds, to keep
this script working.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple


def _inductor_options(text: str) -> dict:
    """``--decode-compile-options``: a JSON object of inductor options (torch.compile's ``options``)."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({error})") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object of inductor options, e.g."
                                         ' \'{"coordinate_descent_tuning": true}\'')
    return options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="prompt lengths of the kernel and time-to-first-token tables (default 16k to 128k; 64 and"
                        " 160 with --smoke)")
    parser.add_argument("--out", default="bench.json", help="JSON results")
    parser.add_argument("--plot", default=None, help="PNG of the speed-up against context length")
    parser.add_argument("--skip-kernels", action="store_true", help="leave out the attention-kernel tables")
    parser.add_argument("--skip-model", action="store_true", help="leave out the time-to-first-token table")
    parser.add_argument("--configs", nargs="+", default=None, metavar="TEXT",
                        help="time-to-first-token configs whose name contains one of these (default: all)")
    parser.add_argument("--decode", type=int, nargs="*", default=None, metavar="LENGTH",
                        help="time per output token at these context lengths (no value: 4096 32768 131072)")
    parser.add_argument("--paths", nargs="+", default=None, metavar="TEXT",
                        help="decode paths whose name contains one of these (default: all)")
    parser.add_argument("--e2e-paths", nargs="+", default=None, metavar="TEXT",
                        help="end-to-end paths whose name contains one of these (default: all)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens timed per decode measurement")
    parser.add_argument("--decode-compile-options", type=_inductor_options, default=None, metavar="JSON",
                        help="inductor options for the compiled decode step of every static path, unpatched and"
                        " swaa alike (CUDA graphs kept), e.g. '{\"coordinate_descent_tuning\": true}', which makes"
                        " batch-1 matrix products bandwidth-tuned Triton reductions (default: transformers'"
                        " compile_config, mode reduce-overhead)")
    parser.add_argument("--e2e", type=int, nargs=2, default=None, metavar=("PROMPT", "NEW"),
                        help="total generate time for a PROMPT-token prompt and NEW new tokens (e.g. 131072 512)")
    parser.add_argument("--batched", type=int, nargs=3, default=None, metavar=("PROMPTS", "LENGTH", "NEW"),
                        help="throughput of a batch job: PROMPTS left-padded prompts of LENGTH/2 to LENGTH tokens, NEW"
                        " new tokens each, in batches of the largest size that fits (e.g. 32 32768 2048)")
    parser.add_argument("--batched-paths", nargs="+", default=None, metavar="TEXT",
                        help="batched paths whose name contains one of these (default: every static + compiled path)")
    parser.add_argument("--max-batch", type=int, default=None, metavar="B",
                        help="largest batch the batched rows try (default PROMPTS); each path steps down from it"
                        " while a batch runs out of GPU memory")
    parser.add_argument("--check-rows", type=int, default=2, metavar="K",
                        help="batched rows: K prompts generated again alone (eager, batch 1), their tokens compared")
    parser.add_argument("--profile", metavar="FILE",
                        help="profile one more generate per row: a time-to-first-token row gets its prefill's"
                        " breakdown (GPU time by kernel kind, GPU busy, kernels), a decode or end-to-end row its"
                        " decode steps' per token (and host time); FILE gets their top kernels and host ops")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, for tests")
    return parser


if __name__ == "__main__":
    _parser().parse_args()  # --help and a mistyped option answer before torch loads

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402
from transformers.generation.configuration_utils import CompileConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import swaa  # noqa: E402
from swaa.backends import flash, flex, reference, sdpa  # noqa: E402
from swaa.plan import plan_forward  # noqa: E402
from swaa.rules import LayerRule, forgets_old_keys, kept_keys, layer_rules, visible_pairs  # noqa: E402
from swaa.tables import markdown_table  # noqa: E402

WINDOW, SINK = 2048, 100
SWAA_CONFIGS = {
    "SWA (no FA decode)": dict(fa_decode=False),
    "FA decode": dict(),
    "FA decode + interleave 2": dict(interleave=2),
    "FA decode + interleave 4": dict(interleave=4),
    "SWA (no FA decode), compiled prefill": dict(fa_decode=False, compile_prefill=True),
    "FA decode + interleave 2, compiled prefill": dict(interleave=2, compile_prefill=True),
}
QWEN3_4B = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, tie_word_embeddings=True,
)
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)


def cuda_seconds(fn, repeat: int = 5, calls: int = 1) -> float:
    """Median seconds of one call of ``fn``, over ``repeat`` timings of ``calls`` back-to-back calls (which
    lets the CPU run ahead of short kernels, as across the layers of a model), after a warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + written): the floor's memory rate."""
    copy_source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    rate = 2 * copy_source.numel() / cuda_seconds(lambda: copy_source.clone())
    del copy_source
    return rate


def kernel_rows(lengths: list[int], heads: int = 32, kv_heads: int = 8, head_dim: int = 128) -> list[dict]:
    """Attention alone, one layer: prefill kernels and decode against a cache of each length."""
    rows = []
    copy_rate = copy_bandwidth()
    for length in lengths:
        q = torch.randn(1, heads, length, head_dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, kv_heads, length, head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        plan = plan_forward(batch_size=1, q_len=length, past_len=0, device=torch.device("cuda"))
        scaling = head_dim**-0.5
        cases = {
            "full causal, sdpa": (sdpa.attend, LayerRule(None)),
            f"window {WINDOW}, flex": (flex.attend, LayerRule(WINDOW)),
            f"window {WINDOW} + {SINK} sinks, flex": (flex.attend, LayerRule(WINDOW, SINK)),
            f"window {WINDOW}, flash": (flash.attend, LayerRule(WINDOW)),
            f"window {WINDOW} + {SINK} sinks, flash": (flash.attend, LayerRule(WINDOW, SINK)),
        }
        for name, (attend, rule) in cases.items():
            seconds = cuda_seconds(lambda: attend(q, k, v, rule=rule, plan=plan, scaling=scaling))
            flops = 4 * head_dim * heads * visible_pairs(rule, length)
            rows.append(dict(length=length, kernel=name, ms=seconds * 1e3, tflops=flops / seconds / 1e12))
        rows += _decode_kernel_rows(q[:, :, -1:], k, v, copy_rate)
        del q, k, v
    return rows


def _decode_kernel_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, copy_rate: float) -> list[dict]:
    """One generated token's attention against ``key.shape[2]`` cached tokens: in a cache that holds exactly
    them (PyTorch's fused kernel, no mask), and in a static cache of twice as many slots, half unwritten, as
    a compiled decode step sees it (with a mask: cuDNN's kernel through ``reference.attend``, which reads every
    slot, and FlexAttention's decoding kernel, which visits only the blocks its block mask lists). Each
    compiled, as in the decode step. The floor reads the written keys and values once."""
    length = key.shape[2]
    scaling = query.shape[-1] ** -0.5
    fa_decode = LayerRule(WINDOW, SINK, True)
    prompt_end = torch.tensor([[length - 1]], device=query.device)
    written = plan_forward(batch_size=1, q_len=1, past_len=length - 1, device=query.device, generate=prompt_end)
    static = plan_forward(batch_size=1, q_len=1, past_len=torch.tensor(length - 1, device=query.device),
                          device=query.device, key_slots=2 * length, generate=prompt_end)
    slots = torch.cat([key, torch.zeros_like(key)], 2), torch.cat([value, torch.zeros_like(value)], 2)
    cases = {
        "decode, FA-decode layer, written cache, sdpa": (sdpa.attend, key, value, written),
        "decode, FA-decode layer, half-written static cache, masked sdpa": (reference.attend, *slots, static),
        # FlexAttention's decoding kernel, for comparison only: no backend takes it for a decode step
        "decode, FA-decode layer, half-written static cache, flex (benchmark only)": (flex.attend, *slots, static),
    }
    read = 2 * key.numel() * key.element_size()
    rows = []
    for name, (attend, keys, values, plan) in cases.items():
        step = torch.compile(lambda: attend(query, keys, values, rule=fa_decode, plan=plan, scaling=scaling)[0])
        seconds = cuda_seconds(step, 5, 36)
        rows.append(dict(length=length, kernel=name, ms=seconds * 1e3, us=seconds * 1e6,
                         read_floor_us=read / copy_rate * 1e6, copy_tb_s=copy_rate / 1e12))
    return rows


class _TokenClock:
    """A generate streamer that notes when each token reaches the host (generate hands it the prompt first),
    and calls ``on_token`` then."""

    def __init__(self, on_token=None):
        self.times: list[float] = []
        self.on_token = on_token

    def put(self, tokens) -> None:
        self.times.append(time.perf_counter())
        if self.on_token:
            self.on_token()

    def end(self) -> None:
        pass


class Timing(NamedTuple):
    """One greedy ``generate``, in seconds: time to first token; time per output token after it (the median
    step: the steady state); the first step after it (where a compiled step is captured into a CUDA graph
    when the cache is new to it); the whole call."""

    ttft: float
    tpot: float
    first_step: float
    total: float


def _clocked_generate(model, prompt: torch.Tensor, new_tokens: int, on_token=None,
                      **generate_kwargs) -> tuple[torch.Tensor, Timing]:
    """One greedy ``generate`` of exactly ``new_tokens``: (the new tokens, (rows, new_tokens); its Timing)."""
    clock = _TokenClock(on_token)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    output = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            streamer=clock, **generate_kwargs)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    steps = [later - earlier for earlier, later in zip(clock.times[1:], clock.times[2:])] or [0.0]
    return output[:, prompt.shape[1]:], Timing(clock.times[1] - start, statistics.median(steps), steps[0], total)


def _timed_generate(model, prompt: torch.Tensor, new_tokens: int, on_token=None, **generate_kwargs) -> Timing:
    return _clocked_generate(model, prompt, new_tokens, on_token, **generate_kwargs)[1]


def model_rows(model, lengths: list[int], configs: dict, profile: str | None = None) -> list[dict]:
    """Time to first token (``generate`` of one token, best of two after a warm-up) and peak memory, per
    config and length. ``profile``: a file to which one more ``generate`` per row adds its top kernels, and
    the row its prefill's breakdown."""
    rows = []
    device = model.device
    for name, fields in configs.items():
        if fields is not None:
            swaa.patch_model(model, window=WINDOW, sink=SINK, **fields)
        for length in lengths:
            prompt = torch.randint(1, model.config.vocab_size, (1, length), device=device)
            first_call = _timed_generate(model, prompt, 2).total  # warm-up: compilation, allocator
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            first = min(_timed_generate(model, prompt, 1).total for _ in range(2))
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None  # no CPU peak
            rows.append(dict(config=name, length=length, ttft_s=first, peak_gib=peak, first_call_s=first_call,
                             **_compile_counts()))
            if profile:
                rows[-1].update(prefill_breakdown(model, prompt, profile, f"{name}, prompt {length}"))
            memory = "" if peak is None else f", peak {peak:.1f} GiB"
            print(f"  {name:28s} {length:>7d}: TTFT {first:.3f} s{memory} (first call {first_call:.1f} s)", flush=True)
    if swaa.is_patched(model):
        swaa.unpatch_model(model)
    return rows


def swaa_configs(smoke: bool) -> dict[str, dict]:
    """The SWAA configs measured; ``--smoke`` leaves out the compiled prefill (inductor's C++ build of a
    prefill takes minutes on a CPU; tests/test_compiled_prefill.py covers it)."""
    return {name: fields for name, fields in SWAA_CONFIGS.items() if not (smoke and fields.get("compile_prefill"))}


def decode_paths(smoke: bool = False, compile_options: dict | None = None) -> dict[str, dict]:
    """Every way to decode: unpatched eager and static + compiled, transformers' native sliding window
    (every layer, static + compiled: the anchor for swaa's bounded layers), each SWAA config both ways (a
    compiled prefill only with the compiled decode step). ``compile_options``: inductor options every
    compiled decode step gets, so that each ratio compares like with like."""
    static = dict(cache_implementation="static")
    if compile_options:  # reduce-overhead is these CUDA graphs; torch.compile takes a mode or options, not both
        static["compile_config"] = CompileConfig(mode=None, options={"triton.cudagraphs": True, **compile_options})
    paths = {"unpatched, eager": dict(fields=None, generate={}),
             "unpatched, static + compiled": dict(fields=None, generate=static),
             f"native sliding window {WINDOW}, static + compiled": dict(fields=None, generate=static, native=True)}
    for name, fields in swaa_configs(smoke).items():
        if not fields.get("compile_prefill"):  # a compiled prefill goes with the compiled decode step
            paths[f"{name}, eager"] = dict(fields=fields, generate={})
        paths[f"{name}, static + compiled"] = dict(fields=fields, generate=static)
    return paths


def _floor_seconds(model, path: dict, context: int, copy_rate: float) -> float:
    """Bytes one decode step must read at least (weights, and the keys and values its token may see), over
    the copy rate: no step can be faster."""
    config = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    per_token = 2 * config.num_key_value_heads * config.head_dim * next(model.parameters()).element_size()
    if path.get("native"):
        seen = [min(context, config.sliding_window)] * config.num_hidden_layers
    elif path["fields"] is None:
        seen = [context] * config.num_hidden_layers
    else:
        rules = layer_rules(swaa.SWAAConfig(window=WINDOW, sink=SINK, **path["fields"]), config.num_hidden_layers)
        seen = [min(context, kept_keys(rule) + 1) if forgets_old_keys(rule) else context for rule in rules]
    return (weight_bytes + per_token * sum(seen)) / copy_rate


def decode_rows(models: dict, lengths: list[int], paths: dict, new_tokens: int, copy_rate: float,
                profile: str | None = None) -> list[dict]:
    """Time per output token of greedy ``generate`` at each context, per path, beside its floor. Static
    caches are sized per length as a user would (prompt + new tokens): full-attention layers read the whole
    cache. Each (path, length) runs once untimed first: compilation and CUDA graph capture stay out of the
    timing. ``profile``: a file to which one more ``generate`` per row adds its top kernels (torch.profiler)."""
    rows = []
    for name, path in paths.items():
        def measure(model, length, kwargs):
            _timed_generate(model, _prompt(model, length), 3, **kwargs)  # compiles, captures, warms the allocator
            ttft, tpot, first_step, _ = _timed_generate(model, _prompt(model, length), new_tokens + 1, **kwargs)
            floor = _floor_seconds(model, path, length, copy_rate)
            print(f"  {name:45s} {length:>7d}: TPOT {tpot * 1e3:.2f} ms (floor {floor * 1e3:.2f}, first step"
                  f" {first_step * 1e3:.1f}), TTFT {ttft:.2f} s", flush=True)
            row = dict(ttft_s=ttft, tpot_ms=tpot * 1e3, floor_ms=floor * 1e3, over_floor=tpot / floor,
                       first_step_ms=first_step * 1e3)
            if profile:
                row.update(decode_breakdown(model, _prompt(model, length), new_tokens + 1, kwargs, profile,
                                            f"{name}, context {length}"))
            return row

        rows += _per_path(models, name, path, lengths, new_tokens + 1, measure,
                          dict(path=name))
    return rows


# kernel kinds of a decode step, by the first name fragment a kernel's name holds: inductor's Triton templates
# (FlexAttention) and cuDNN's and flash's attention; cuBLAS's and CUTLASS's products; inductor's fused Triton
# kernels (named after the ops they fuse, "attention" among them) and PyTorch's own elementwise kernels
KERNEL_KINDS = {
    "attention": ("triton_tem", "flash", "fmha", "cudnn", "attention", "sdpa"),
    "matrix products": ("gemm", "gemv", "nvjet", "cutlass", "xmma", "matmul", "splitk", "dot"),
    "fused elementwise": ("triton", "elementwise", "reduce", "vectorized", "softmax", "cat", "index", "copy"),
}
SKIPPED_STEPS = 2  # a profiled generate's first decode steps (the first captures a CUDA graph) are not counted


def kernel_kind(name: str) -> str:
    name = name.lower()
    if name.startswith("triton_") and not name.startswith("triton_tem"):
        # coordinate_descent_tuning makes a one-row product a reduction named after it: triton_red_fused_mm_...
        # (a "bmm" in a fused name is rotary's tiny product)
        reduction = name.startswith(("triton_red_", "triton_per_"))
        return "matrix products" if reduction and "mm" in name.split("_") else "fused elementwise"
    return next((kind for kind, parts in KERNEL_KINDS.items() if any(part in name for part in parts)), "other")


def _busy_ns(intervals: list[tuple[int, int]]) -> int:
    """Length of the union of (start, end) intervals: the time the GPU ran at least one kernel."""
    busy, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            busy, reach = busy + end - start, end
        elif end > reach:
            busy, reach = busy + end - reach, end
    return busy


HOST_WAITS = ("cudaMemcpyAsync", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def gpu_work(events) -> list:
    """The profiler's events that occupy the GPU (kernels, copies, fills), not its GPU-side annotations (the
    host's ranges drawn on the GPU's timeline, over kernels already counted). Told by device and annotation
    flag: torch 2.11's events have no activity type."""
    return [event for event in events
            if event.device_type() == torch.autograd.DeviceType.CUDA and not event.is_user_annotation()]


def _activities(prompt: torch.Tensor) -> list:
    cuda = [torch.profiler.ProfilerActivity.CUDA] if prompt.is_cuda else []
    return [torch.profiler.ProfilerActivity.CPU, *cuda]


def _gpu_times(profiler, calls: int) -> dict:
    """Per call: GPU time of each kind of kernel, kernels run and GPU busy time (the union of their intervals)."""
    kernels = gpu_work(profiler.profiler.kineto_results.events())
    times = {f"{kind}_ms": 0.0 for kind in [*KERNEL_KINDS, "other"]}
    for event in kernels:
        times[f"{kernel_kind(event.name())}_ms"] += event.duration_ns() / 1e6 / calls
    busy = _busy_ns([(event.start_ns(), event.end_ns()) for event in kernels]) / 1e6 / calls
    return dict(times, kernels=len(kernels) / calls, gpu_busy_ms=busy)


def _top_kernels(profiler, prompt: torch.Tensor) -> str:
    sort_by = "self_device_time_total" if prompt.is_cuda else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=90)


def prefill_breakdown(model, prompt: torch.Tensor, path: str, title: str) -> dict:
    """Where a prefill's time goes, from one more ``generate`` of one token, profiled: GPU time of each kind of
    kernel, kernels run, GPU busy. Appends the top kernels to ``path``."""
    with torch.profiler.profile(activities=_activities(prompt)) as profiler:
        _timed_generate(model, prompt, 1)
    with open(path, "a") as file:
        file.write(f"## {title}; prefill profiled\n{_top_kernels(profiler, prompt)}\n\n")
    return _gpu_times(profiler, 1)


def decode_breakdown(model, prompt: torch.Tensor, new_tokens: int, kwargs: dict, path: str, title: str) -> dict:
    """Where a decode step's time goes, from one more ``generate`` profiled over its decode steps only (the
    prefill and the first ``SKIPPED_STEPS`` steps left out). Per token: GPU time of each kind of kernel,
    kernels run, GPU busy (the union of kernel intervals), wall, and host time: the CPU's own time less the
    time it waits for the GPU (``generate`` reads every token back, so the two take turns: host work shows in
    the wall time). Appends the top kernels and host ops to ``path``."""
    active = new_tokens - SKIPPED_STEPS - 1
    if active < 1:
        raise ValueError(f"--profile needs at least {SKIPPED_STEPS + 2} new tokens per row, got {new_tokens}")
    # a step per token reaching the host: [start, prompt), the prefill, the skipped steps, then the active ones
    schedule = torch.profiler.schedule(wait=1 + SKIPPED_STEPS, warmup=1, active=active, repeat=1)
    with torch.profiler.profile(activities=_activities(prompt), schedule=schedule) as profiler:
        timing = _timed_generate(model, prompt, new_tokens, on_token=profiler.step, **kwargs)
    averages = profiler.key_averages()
    waited = sum(average.self_cpu_time_total for average in averages if average.key in HOST_WAITS)
    host = (averages.self_cpu_time_total - waited) / 1e3 / active
    with open(path, "a") as file:
        host_ops = averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=90)
        file.write(f"## {title}; {active} decode steps profiled\n{_top_kernels(profiler, prompt)}\n"
                   f"host ops:\n{host_ops}\n\n")
    times = _gpu_times(profiler, active)
    times["kernels_per_token"] = times.pop("kernels")
    return dict(times, step_wall_ms=timing.tpot * 1e3, host_ms=host)


def end_to_end_rows(models: dict, length: int, new_tokens: int, paths: dict, profile: str | None = None,
                    profiled_tokens: int = 64) -> list[dict]:
    """Total time of one greedy ``generate`` of ``new_tokens`` after a ``length``-token prompt, per path,
    after an untimed run of the same call with 3 new tokens (which compiles what it compiles; its time is the
    row's ``first_call_s``). Static caches as in ``decode_rows``. ``profile``: as in ``decode_rows``, over a
    generate of ``profiled_tokens`` with the same cache."""
    rows = []
    for name, path in paths.items():
        def measure(model, length, kwargs):
            first_call = _timed_generate(model, _prompt(model, length), 3, **kwargs).total
            ttft, tpot, first_step, seconds = _timed_generate(model, _prompt(model, length), new_tokens, **kwargs)
            print(f"  {name:45s} {length} + {new_tokens}: {seconds:.2f} s (TTFT {ttft:.2f} s, TPOT {tpot * 1e3:.2f} ms,"
                  f" first step {first_step * 1e3:.1f} ms; first call {first_call:.1f} s)", flush=True)
            row = dict(seconds=seconds, ttft_s=ttft, tpot_ms=tpot * 1e3, first_step_ms=first_step * 1e3,
                       first_call_s=first_call)
            if profile:
                row.update(decode_breakdown(model, _prompt(model, length), min(profiled_tokens, new_tokens), kwargs,
                                            profile, f"{name}, context {length}"))
            return row

        rows += _per_path(models, name, path, [length], new_tokens, measure,
                          dict(path=name, new_tokens=new_tokens))
    return rows


def end_to_end_speedups(rows: list[dict], rate: str | None = None) -> list[dict]:
    """Each row with its speed-up over the fastest unpatched path of the same run (none without one): by
    ``seconds``, or by the ``rate`` column (work per second) where rows did the same work at different sizes."""
    key = rate or "seconds"
    unpatched = [row[key] for row in rows if row["path"].startswith("unpatched") and key in row]
    best = max(unpatched) if rate else min(unpatched or [0])
    return [dict(row, speedup=(row[key] / best if rate else best / row[key])) if unpatched and key in row else row
            for row in rows]


def evaluation_set(model, prompts: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    """``prompts`` random prompts of ``length // 2`` to ``length`` tokens (the first exactly ``length``), longest
    first, as evaluation harnesses order them: a batch holds prompts of similar lengths, the first the longest."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (prompts,), generator=generator)
    lengths[0] = length
    return [torch.randint(1, model.config.vocab_size, (n,), generator=generator)
            for n in sorted(lengths.tolist(), reverse=True)]


def left_padded(prompts: list[torch.Tensor], device) -> dict:
    """``generate``'s inputs for ``prompts``: input_ids left-padded (with 0) to the longest, attention_mask."""
    longest = max(len(prompt) for prompt in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt
    mask = (torch.arange(longest) >= longest - torch.tensor([len(p) for p in prompts])[:, None]).long()
    return dict(prompt=ids.to(device), attention_mask=mask.to(device), pad_token_id=0)


def _forget_compiled_steps(model) -> None:
    """After a batch ran out of memory: its tensors freed, its compiled step and static cache size forgotten."""
    gc.collect()
    torch._dynamo.reset()
    vars(model).pop("_previous_max_cache_length", None)
    if model.device.type == "cuda":
        torch.cuda.empty_cache()


def batched_rows(models: dict, prompts: int, length: int, new_tokens: int, paths: dict, max_batch: int | None = None,
                 check_rows: int = 2) -> list[dict]:
    """Throughput of a batch job, per path: ``evaluation_set``'s prompts in consecutive batches, one greedy
    ``generate`` of ``new_tokens`` each (the paths' static cache, sized ``length + new_tokens + 1``: one decode
    graph for every batch), at the largest batch that fits: from ``max_batch`` (default ``prompts``) down by a
    quarter while the first batch (the longest prompts, 2 new tokens: the untimed call that compiles) runs out of
    GPU memory. The last batch is filled up with the first prompts (a fixed decode shape; their tokens are not
    counted). ``check_rows`` prompts are generated again alone, eager (dynamic cache, batch 1), and their tokens
    compared with the batch's: ``matched`` is the length of the common prefix."""
    rows = []
    for name, path in paths.items():
        def measure(model, length, kwargs):
            dataset = evaluation_set(model, prompts, length)
            batch, too_large = min(max_batch or prompts, prompts), []
            while True:
                out_of_memory = False
                try:
                    first_call = _clocked_generate(model, **left_padded(dataset[:batch], model.device),
                                                   new_tokens=2, **kwargs)[1].total
                except torch.OutOfMemoryError:
                    if batch == 1:
                        raise
                    out_of_memory = True  # freed outside the handler, whose traceback holds the batch's tensors
                if not out_of_memory:
                    break
                too_large.append(batch)
                batch -= max(1, batch // 4)
                _forget_compiled_steps(model)
            if model.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            tokens, timings, start = [], [], time.perf_counter()
            for first in range(0, prompts, batch):
                group = dataset[first:first + batch]
                new, timing = _clocked_generate(model, **left_padded(group + dataset[:batch - len(group)], model.device),
                                                new_tokens=new_tokens, **kwargs)
                tokens += list(new[:len(group)])
                timings.append(timing)
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() / 2**30 if model.device.type == "cuda" else float("nan")
            checks = []
            for row in sorted({round(i * (prompts - 1) / max(1, check_rows - 1)) for i in range(check_rows)}):
                alone = _clocked_generate(model, dataset[row][None].to(model.device), new_tokens, pad_token_id=0)[0][0]
                same = (alone == tokens[row]).long().cumprod(0).sum().item()
                checks.append(dict(row=row, prompt_tokens=len(dataset[row]), matched=same))
            tpot = statistics.median(timing.tpot for timing in timings)
            print(f"  {name:45s} {prompts} x {length} + {new_tokens}: batch {batch} ({len(timings)} batches), {seconds:.1f} s,"
                  f" {prompts * new_tokens / seconds:.1f} tok/s, peak {peak:.1f} GiB; alone:"
                  f" {[check['matched'] for check in checks]} of {new_tokens} tokens the same", flush=True)
            return dict(batch=batch, too_large=too_large, batches=len(timings), seconds=seconds,
                        tokens_per_s=prompts * new_tokens / seconds, peak_gib=peak, first_call_s=first_call,
                        prefill_s=sum(timing.ttft for timing in timings), tpot_ms=tpot * 1e3,
                        decode_tokens_per_s=batch / tpot if tpot else float("nan"),
                        mean_prompt=sum(map(len, dataset)) / prompts, checks=checks,
                        same_tokens=f"{sum(check['matched'] for check in checks)}/{len(checks) * new_tokens}")

        rows += _per_path(models, name, path, [length], new_tokens, measure,
                          dict(path=name, prompts=prompts, new_tokens=new_tokens))
    return end_to_end_speedups(rows, "tokens_per_s")


def _prompt(model, length: int) -> torch.Tensor:
    return torch.randint(1, model.config.vocab_size, (1, length), device=model.device)


def _per_path(models: dict, name: str, path: dict, lengths: list[int], new_tokens: int,
              measure, row: dict) -> list[dict]:
    """``measure(model, length, generate_kwargs)`` for one path at each length, with the path's patch
    applied. Each (path, length) starts afresh, as a user running one config at one size: its own compiled
    code (``torch._dynamo.reset``: static shapes, not the dynamic ones a second size would bring) and a static
    cache of its own size (``generate`` keeps every later static cache at least as large as the largest one
    before, through ``_previous_max_cache_length``; left in place, a 4k row after a 128k one reads 128k slots).
    A path that fails is a row with its error and the run goes on: one path's failure must not lose the
    others' numbers."""
    model = models["native" if path.get("native") else "base"]
    rows = []
    try:
        if path["fields"] is not None:
            swaa.patch_model(model, window=WINDOW, sink=SINK, **path["fields"])
        for length in lengths:
            torch._dynamo.reset()
            vars(model).pop("_previous_max_cache_length", None)
            kwargs = dict(path["generate"])
            if kwargs:  # one cache size for the untimed and the timed call: no recompilation in between
                kwargs["max_cache_len"] = length + new_tokens + 1
            rows.append(dict(row, length=length, **_counted(lambda: measure(model, length, kwargs))))
    except Exception as error:  # noqa: BLE001 - reported in the table and the JSON
        print(f"  {name}: FAILED {type(error).__name__}: {error}", flush=True)
        rows.append(dict(row, error=f"{type(error).__name__}: {str(error)[:500]}"))
    finally:
        if swaa.is_patched(model):
            swaa.unpatch_model(model)
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _compile_counts() -> dict:
    """Graphs torch.compile has built so far in this process, the graph breaks it met, and the times inductor
    ran a compiled step without CUDA graphs (each adds every kernel launch back to every step;
    ``TORCH_LOGS=cudagraphs`` says why, but on torch 2.11 its logger also raised an AssertionError once a second
    cache size was compiled)."""
    from torch._dynamo.utils import counters

    return dict(compiled_graphs=int(counters["stats"]["unique_graphs"]),
                graph_breaks=sum(counters["graph_break"].values()),
                cudagraph_skips=int(counters["inductor"]["cudagraph_skips"]))


def _counted(measure) -> dict:
    """``measure()``'s row, with what ``_compile_counts`` counted during it: the graphs this row compiled (its
    decode step, FlexAttention's prefill kernels), and its steps without CUDA graphs."""
    before = _compile_counts()
    row = measure()
    return dict(row, **{name: count - before[name] for name, count in _compile_counts().items()})


def speedups(rows: list[dict]) -> list[dict]:
    """Each SWAA config's TTFT and peak memory against full attention (sdpa) at the same length, same run; only
    at lengths beyond the window: a prompt the window covers is attended as full attention attends it, and the
    ratio would measure noise. No memory ratio without GPU peaks."""
    full = {r["length"]: r for r in rows if r["config"] == "full attention (sdpa)"}
    return [dict(config=r["config"], length=r["length"], ttft_speedup=full[r["length"]]["ttft_s"] / r["ttft_s"],
                 memory_ratio=None if r["peak_gib"] is None else r["peak_gib"] / full[r["length"]]["peak_gib"])
            for r in rows if r["length"] in full and r["config"] != "full attention (sdpa)" and r["length"] > WINDOW]


def plot(ratios: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for config in dict.fromkeys(r["config"] for r in ratios):
        points = [r for r in ratios if r["config"] == config]
        axis.plot([p["length"] for p in points], [p["ttft_speedup"] for p in points], marker="o", label=config)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("prompt tokens")
    axis.set_ylabel("time-to-first-token speed-up vs full attention")
    axis.axhline(1, color="gray", linewidth=0.8)
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _native_sliding_window_model(base, window: int):
    """The same model with transformers' own sliding window on every layer (same weights, no copy)."""
    config = base.config.__class__(**{**base.config.to_dict(), "use_sliding_window": True, "sliding_window": window,
                                      "max_window_layers": 0, "layer_types": None})
    with torch.device(base.device):
        native = base.__class__(config).to(base.dtype)
    native.load_state_dict(base.state_dict(), assign=True)  # its own random weights are freed
    native.tie_weights()
    native.set_attn_implementation("sdpa")
    return native.eval()


# the batched rows' default paths: the best unpatched path and the two swaa configs the docs compare
BATCHED_PATHS = ("unpatched, static", "SWA (no FA decode), static", "interleave 2, static")


def _select(paths: dict, wanted: list[str] | None) -> dict:
    return {name: path for name, path in paths.items() if not wanted or any(w in name for w in wanted)}


def main(argv: list[str] | None = None) -> dict:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("measures a 4B-parameter model on a CUDA GPU, and this machine has none; --smoke runs a tiny"
                     " model on the CPU")

    cuda = torch.cuda.is_available() and not args.smoke
    torch.manual_seed(0)
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device(device):
        model = Qwen3ForCausalLM(Qwen3Config(**(TINY if args.smoke else QWEN3_4B))).to(dtype).eval()
    model.set_attn_implementation("sdpa")
    configs = _select({"full attention (sdpa)": None, **swaa_configs(args.smoke)}, args.configs)
    lengths = args.lengths or ([64, 160] if args.smoke else [16384, 32768, 65536, 131072])
    decode_lengths = ([96] if args.smoke else [4096, 32768, 131072]) if args.decode == [] else args.decode or []
    result = dict(
        date=datetime.date.today().isoformat(),
        gpu=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        torch=torch.__version__, transformers=transformers.__version__, window=WINDOW, sink=SINK,
        decode_compile_options=args.decode_compile_options,
        kernels=kernel_rows(lengths) if cuda and not args.skip_kernels else [],
    )
    if args.profile:
        open(args.profile, "w").close()
    result["model"] = [] if args.skip_model else model_rows(model, lengths, configs, args.profile)
    result["speedups"] = speedups(result["model"])
    every_path = decode_paths(args.smoke, args.decode_compile_options)
    paths = _select(every_path, args.paths) if decode_lengths else {}
    e2e_paths = _select(every_path, args.e2e_paths) if args.e2e else {}
    models = {"base": model}
    if any(path.get("native") for path in [*paths.values(), *e2e_paths.values()]):
        models["native"] = _native_sliding_window_model(model, WINDOW)
    result["copy_tb_s"] = (copy_bandwidth() if cuda else float("nan")) / 1e12
    result["decode"] = decode_rows(models, decode_lengths, paths, args.new_tokens, result["copy_tb_s"] * 1e12,
                                   args.profile) if paths else []
    result["end_to_end"] = end_to_end_speedups(
        end_to_end_rows(models, *args.e2e, e2e_paths, args.profile, args.new_tokens) if e2e_paths else [])
    batched_paths = _select(every_path, args.batched_paths or list(BATCHED_PATHS)) if args.batched else {}
    result["batched"] = batched_rows(models, *args.batched, batched_paths, args.max_batch,
                                     args.check_rows) if batched_paths else []
    with open(args.out, "w") as file:
        json.dump(result, file, indent=1)
    if args.plot and result["speedups"]:
        shape = TINY if args.smoke else QWEN3_4B
        plot(result["speedups"], args.plot,
             f"{result['gpu']}, {'tiny' if args.smoke else 'Qwen3-4B'}-shaped model ({shape['num_hidden_layers']} layers,"
             f" hidden {shape['hidden_size']}, {shape['num_attention_heads']}/{shape['num_key_value_heads']} heads),"
             f" {str(dtype).removeprefix('torch.')}, window {WINDOW}, sink {SINK}")
    if args.smoke:
        print(f"\nSMOKE RUN: a tiny model on the CPU, to check that this script runs; its times say nothing about"
              f" SWAA's speed, and no ratio is printed where the window ({WINDOW}) covers the prompt")
    print(f"\n{result['gpu']}, torch {result['torch']}, transformers {result['transformers']}, {result['date']}"
          + (f"; every compiled decode step with {args.decode_compile_options}" if args.decode_compile_options else ""))
    if result["kernels"]:
        print(markdown_table(["length", "kernel", "ms", "tflops"], [r for r in result["kernels"] if "tflops" in r]))
        print(markdown_table(["length", "kernel", "us", "read_floor_us"], [r for r in result["kernels"] if "us" in r]))
    if result["model"]:
        print(markdown_table(["config", "length", "ttft_s", "peak_gib", "first_call_s", "compiled_graphs",
                              "graph_breaks"], result["model"]))
        if result["speedups"]:
            print(markdown_table(["config", "length", "ttft_speedup", "memory_ratio"], result["speedups"]))
    if prefills := [row for row in result["model"] if "gpu_busy_ms" in row]:
        print(markdown_table(["config", "length", "ttft_s", "gpu_busy_ms",
                              *[f"{kind}_ms" for kind in [*KERNEL_KINDS, "other"]], "kernels"], prefills))
    if result["decode"]:
        print(markdown_table(["path", "length", "tpot_ms", "floor_ms", "over_floor", "first_step_ms", "ttft_s",
                              "compiled_graphs", "cudagraph_skips", "error"], result["decode"]))
    if result["end_to_end"]:
        print(markdown_table(["path", "length", "new_tokens", "seconds", "speedup", "ttft_s", "tpot_ms",
                              "first_call_s", "cudagraph_skips", "error"], result["end_to_end"]))
    if result["batched"]:
        print(markdown_table(["path", "prompts", "length", "new_tokens", "batch", "batches", "seconds", "tokens_per_s",
                              "speedup", "prefill_s", "tpot_ms", "decode_tokens_per_s", "peak_gib", "first_call_s",
                              "same_tokens", "error"], result["batched"]))
    if breakdown := [row for row in [*result["decode"], *result["end_to_end"]] if "gpu_busy_ms" in row]:
        print(markdown_table(["path", "length", "step_wall_ms", "gpu_busy_ms", "host_ms",
                              *[f"{kind}_ms" for kind in [*KERNEL_KINDS, "other"]], "kernels_per_token"], breakdown))
    return result


if __name__ == "__main__":
    main()
