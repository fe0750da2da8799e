"""benchmarks/bench.py keeps working: its --smoke run (tiny model, CPU) writes JSON, a plot and tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers.cache_utils import StaticLayer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench  # noqa: E402


def test_bench_smoke_writes_results(tmp_path, capsys):
    out, plot = tmp_path / "bench.json", tmp_path / "speedup.png"
    result = bench.main(["--smoke", "--out", str(out), "--plot", str(plot), "--decode", "--e2e", "80", "4",
                         "--e2e-paths", "unpatched, static", "interleave 2, static"])
    saved = json.loads(out.read_text())
    assert [(r["config"], r["length"]) for r in saved["model"]] == [(r["config"], r["length"]) for r in result["model"]]
    assert {row["config"] for row in saved["model"]} == {"full attention (sdpa)", *bench.swaa_configs(smoke=True)}
    assert saved["speedups"] == [] and not plot.exists()  # prompts of 64 and 160 tokens: the window covers them
    assert all(row["peak_gib"] is None for row in saved["model"])  # no GPU: no peak, and no "nan GiB"
    assert [row["path"] for row in saved["decode"]] == list(bench.decode_paths(smoke=True))
    assert all(row["tpot_ms"] > 0 for row in saved["decode"])
    assert [row["path"] for row in saved["end_to_end"]] == ["unpatched, static + compiled",
                                                            "FA decode + interleave 2, static + compiled"]
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("| FA decode + interleave 2, static")


def test_smoke_says_it_is_one_and_gives_a_ratio_only_beyond_the_window(tmp_path, capsys):
    plot = tmp_path / "speedup.png"
    result = bench.main(["--smoke", "--out", str(tmp_path / "b.json"), "--plot", str(plot), "--configs",
                         "full attention", "interleave 2", "--lengths", "64", str(bench.WINDOW + 1)])
    assert [(row["config"], row["length"]) for row in result["speedups"]] == [("FA decode + interleave 2",
                                                                              bench.WINDOW + 1)]
    assert result["speedups"][0]["ttft_speedup"] > 0 and result["speedups"][0]["memory_ratio"] is None
    assert plot.read_bytes().startswith(b"\x89PNG")
    out = capsys.readouterr().out
    assert "SMOKE RUN: a tiny model on the CPU" in out and "nan" not in out


@pytest.mark.skipif(bench.torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_without_cuda_it_says_so_at_once(capsys):
    with pytest.raises(SystemExit) as exit:
        bench.main(["--decode"])
    assert exit.value.code == 2 and "CUDA GPU" in capsys.readouterr().err


def test_a_failing_path_is_a_row_with_its_error_and_the_others_still_run(tmp_path, monkeypatch):
    real = bench._timed_generate

    def fails_on_static(model, prompt, new_tokens, **kwargs):
        if "cache_implementation" in kwargs and bench.swaa.is_patched(model):
            raise RuntimeError("compile failed")
        return real(model, prompt, new_tokens, **kwargs)

    monkeypatch.setattr(bench, "_timed_generate", fails_on_static)
    result = bench.main(["--smoke", "--skip-model", "--out", str(tmp_path / "b.json"), "--decode",
                         "--paths", "SWA (no FA decode)", "unpatched, eager"])
    rows = {row["path"]: row for row in result["decode"]}
    assert rows["SWA (no FA decode), static + compiled"]["error"] == "RuntimeError: compile failed"
    assert rows["SWA (no FA decode), eager"]["tpot_ms"] > 0 and rows["unpatched, eager"]["tpot_ms"] > 0


def test_profile_breaks_down_the_prefill_of_each_time_to_first_token_row(tmp_path, capsys):
    profile = tmp_path / "prefill_profile.txt"
    result = bench.main(["--smoke", "--out", str(tmp_path / "b.json"), "--configs", "interleave 2", "--lengths", "64",
                         "--profile", str(profile)])
    assert [row["config"] for row in result["model"]] == ["FA decode + interleave 2"]
    assert "FA decode + interleave 2, prompt 64; prefill profiled" in profile.read_text()
    row = result["model"][0]
    assert row["gpu_busy_ms"] == 0 and row["kernels"] == 0 and row["matrix products_ms"] == 0  # no GPU here
    assert "| FA decode + interleave 2 | 64 |" in capsys.readouterr().out.split("gpu_busy_ms")[-1]


def test_profile_breaks_down_the_decode_steps_of_each_row(tmp_path):
    profile = tmp_path / "decode_profile.txt"
    result = bench.main(["--smoke", "--skip-model", "--out", str(tmp_path / "b.json"), "--decode", "--paths",
                         "unpatched, eager", "interleave 2, eager", "--profile", str(profile), "--new-tokens", "6",
                         "--e2e", "80", "8", "--e2e-paths", "unpatched, eager"])
    text = profile.read_text()
    rows = [*result["decode"], *result["end_to_end"]]
    # a decode row generates --new-tokens + 1 = 7 tokens: the prefill's, then 6 decode steps, 2 skipped
    assert text.count("4 decode steps profiled") == 2 and text.count("3 decode steps profiled") == 1
    assert "unpatched, eager, context 96" in text and "Self CPU" in text and "aten::" in text
    assert all(isinstance(row["cudagraph_skips"], int) and row["step_wall_ms"] > 0 for row in rows)
    assert all(row["gpu_busy_ms"] == 0 and 0 < row["host_ms"] for row in rows)  # no GPU: the host is everything
    assert result["end_to_end"][0]["speedup"] == 1


class _Event:
    def __init__(self, device, annotation):
        self.device, self.annotation = device, annotation

    def device_type(self):
        return self.device

    def is_user_annotation(self):
        return self.annotation


def test_gpu_work_is_what_runs_on_the_gpu_and_not_its_annotations():
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    kernel, annotation, host_op = _Event(cuda, False), _Event(cuda, True), _Event(cpu, False)
    assert bench.gpu_work([kernel, annotation, host_op]) == [kernel]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        torch.ones(3).sum()
    assert bench.gpu_work(profiler.profiler.kineto_results.events()) == []  # this torch's events answer both


def test_kernels_are_sorted_into_kinds_and_busy_time_counts_overlaps_once():
    assert [bench.kernel_kind(name) for name in (
        "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>",
        "nvjet_tst_64x8_64x16_4x1_v_bz_TNT", "triton_poi_fused_add_mul_0", "triton_tem_fused_flex_attention_0",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "Memcpy DtoD (Device -> Device)",
        "triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_add_bmm_cat_0",
        "triton_red_fused_mm_t_view_9", "triton_red_fused__to_copy_add_mean_mm_mul_pow_rsqrt_t_view_16",
        "triton_per_fused__to_copy__unsafe_view_add_arange_bmm_cat_cos_index_copy_mean_mul_neg_3",
    )] == ["matrix products", "matrix products", "fused elementwise", "attention", "attention", "other",
           "fused elementwise", "matrix products", "matrix products", "fused elementwise"]
    assert bench._busy_ns([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17


def test_every_row_gets_a_static_cache_of_its_own_size(tmp_path, monkeypatch):
    """generate sizes a static cache at least as large as the model's largest before: a 4k row measured after
    a 128k row would read 128k slots. Each row's caches must have the size that row asks for."""
    asked, made = [], []
    real_generate, real_layer = bench._timed_generate, StaticLayer.__init__

    def timed(model, prompt, new_tokens, **kwargs):
        asked.append(kwargs.get("max_cache_len"))
        return real_generate(model, prompt, new_tokens, **kwargs)

    def layer(self, max_cache_len, *args, **kwargs):
        made.append((asked[-1], max_cache_len))
        real_layer(self, max_cache_len, *args, **kwargs)

    monkeypatch.setattr(bench, "_timed_generate", timed)
    monkeypatch.setattr(StaticLayer, "__init__", layer)
    bench.main(["--smoke", "--skip-model", "--out", str(tmp_path / "b.json"), "--decode", "160", "64", "--paths",
                "unpatched, static", "interleave 2, static", "--e2e", "64", "4", "--e2e-paths", "interleave 2, static"])
    assert {size for size, _ in made} == {160 + 66, 64 + 66, 64 + 5}
    assert all(size == made_size for size, made_size in made), sorted(set(made))


def test_decode_compile_options_reach_every_compiled_step_unpatched_and_patched_alike(tmp_path, monkeypatch):
    """A setting a user can choose for the shared decode step is measured on both models, or its ratio is not
    like with like: every static path's generate gets the same compile_config, eager paths none."""
    seen = {}
    real = bench._timed_generate

    def timed(model, prompt, new_tokens, **kwargs):
        config = kwargs.get("compile_config")
        seen.setdefault((bench.swaa.is_patched(model), "cache_implementation" in kwargs),
                        set()).add(None if config is None else (config.mode, tuple(sorted(config.options.items()))))
        return real(model, prompt, new_tokens, **kwargs)

    monkeypatch.setattr(bench, "_timed_generate", timed)
    result = bench.main(["--smoke", "--skip-model", "--out", str(tmp_path / "b.json"), "--decode", "96", "--paths",
                         "unpatched", "interleave 2", "--decode-compile-options", '{"coordinate_descent_tuning": true}'])
    tuned = (None, (("coordinate_descent_tuning", True), ("triton.cudagraphs", True)))
    assert seen == {(False, True): {tuned}, (True, True): {tuned}, (False, False): {None}, (True, False): {None}}
    assert result["decode_compile_options"] == {"coordinate_descent_tuning": True}
    assert all("error" not in row for row in result["decode"])


@pytest.mark.parametrize("text,says", [("[1]", "not a JSON object of inductor options"), ("{bad", "is not JSON")])
def test_decode_compile_options_that_are_no_json_object_are_refused_by_name(capsys, text, says):
    with pytest.raises(SystemExit) as exit:
        bench.main(["--smoke", "--decode-compile-options", text])
    error = capsys.readouterr().err
    assert exit.value.code == 2 and "--decode-compile-options" in error and repr(text) in error and says in error


def test_batched_rows_step_down_to_a_batch_that_fits_and_keep_one_shape(tmp_path, monkeypatch):
    """The batched row: a batch that runs out of memory is retried smaller; every timed batch has the same rows
    (the last one filled up), left-padded prompts of mixed lengths; the throughput counts the real prompts only;
    rows generated alone give the batch's tokens (float32 on the CPU)."""
    shapes = []
    real = bench._clocked_generate

    def small_memory(model, prompt, new_tokens, **kwargs):
        shapes.append((tuple(prompt.shape), new_tokens, kwargs.get("attention_mask")))
        if prompt.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, prompt, new_tokens, **kwargs)

    monkeypatch.setattr(bench, "_clocked_generate", small_memory)
    result = bench.main(["--smoke", "--skip-model", "--out", str(tmp_path / "b.json"), "--batched", "5", "96", "6",
                         "--max-batch", "4", "--batched-paths", "unpatched, static", "SWA (no FA decode), static"])
    rows = result["batched"]
    assert [row["path"] for row in rows] == ["unpatched, static + compiled", "SWA (no FA decode), static + compiled"]
    for row in rows:
        assert (row["batch"], row["too_large"], row["batches"]) == (2, [4, 3], 3)
        assert row["tokens_per_s"] == pytest.approx(5 * 6 / row["seconds"])
        assert [check["row"] for check in row["checks"]] == [0, 4] and row["same_tokens"] == "12/12"
    assert rows[0]["speedup"] == 1 and rows[1]["speedup"] == pytest.approx(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"])
    timed = [(shape, mask) for shape, new, mask in shapes if new == 6 and shape[0] == 2]
    assert len(timed) == 6 and all(shape[1] <= 96 for shape, _ in timed)
    first_mask = timed[0][1]
    assert first_mask[:, 0].tolist() == [1, 0] and first_mask[1].sum() < 96  # left-padded, mixed lengths
    lengths = [len(prompt) for prompt in bench.evaluation_set(bench.Qwen3ForCausalLM(bench.Qwen3Config(**bench.TINY)), 5, 96)]
    assert lengths[0] == 96 and lengths == sorted(lengths, reverse=True) and min(lengths) >= 48
