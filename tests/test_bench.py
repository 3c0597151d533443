"""benchmarks/bench.py: row variants, the byte counter, busy-time unions, roofline arithmetic."""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import bench
from bench import (
    ByteCounter,
    parse_models,
    parse_variant,
    pick_peaks,
    roofline,
    roofline_pct,
    run_order,
    summarize_profile,
    union_length,
)

# --- variants ---------------------------------------------------------------------------------


def test_variant_defaults_come_from_the_global_flags() -> None:
    v = parse_variant("tagf", bf16=True, compile=True)
    assert (v.model, v.bf16, v.compile, v.precision) == ("tagf", True, True, "bf16")
    v = parse_variant("rjca")
    assert (v.model, v.bf16, v.compile, v.precision) == ("rjca", False, False, "fp32")


@pytest.mark.parametrize(
    ("spec", "flags", "want"),
    [
        ("tagf:bf16", (False, False), (True, False)),
        ("tagf:compile", (False, False), (False, True)),
        ("tagf:bf16+compile", (False, False), (True, True)),
        ("tagf:fp32", (True, True), (False, True)),
        ("tagf:eager", (True, True), (True, False)),
        ("tagf:fp32+eager", (True, True), (False, False)),
        ("tagf: bf16 + compile ", (False, False), (True, True)),
    ],
)
def test_variant_options_override_the_global_flags(spec, flags, want) -> None:
    v = parse_variant(spec, bf16=flags[0], compile=flags[1])
    assert (v.model, v.bf16, v.compile) == ("tagf", *want)
    assert v.spec == spec.strip()


def test_unknown_option_names_it_and_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown option 'fp16'") as exc:
        parse_variant("tagf:bf16+fp16")
    for opt in ("bf16", "fp32", "compile", "eager"):
        assert opt in str(exc.value).split("valid options:")[1]


def test_unknown_model_and_clashing_options_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown model 'tagff'"):
        parse_variant("tagff:bf16")
    with pytest.raises(ValueError, match="'bf16' and 'fp32' clash"):
        parse_variant("tagf:bf16+fp32")
    with pytest.raises(ValueError, match="'compile' and 'eager' clash"):
        parse_variant("tagf:compile+eager")


def test_graphs_option_is_its_own_field_and_shows_in_the_compile_column() -> None:
    v = parse_variant("tagf:bf16+graphs")
    assert (v.bf16, v.compile, v.graphs) == (True, False, True)
    assert parse_variant("tagf:compile").graphs is False
    assert bench._runs_as({"compile": False, "graphs": True}) == "eager+graphs"
    assert bench._runs_as({"compile": True, "graphs": False}) == "compile"
    assert bench._runs_as({"compile": True}) == "compile"  # rows written before the option


def test_graphs_rows_refuse_the_cpu_with_the_reason() -> None:
    with pytest.raises(ValueError, match="graphs option needs --device cuda"):
        bench.cuda_graphed(lambda: None, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_training_step_on_cuda_matches_the_eager_step() -> None:
    """Two steps replayed from a CUDA graph leave the same weights as two eager steps from the
    same start (warm-up steps included on both sides), so the graphs rows time real training."""
    dev = torch.device("cuda")

    def run(graphs: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        model = model.to(dev)
        x, y = torch.randn(4, 8, device=dev), torch.randn(4, 2, device=dev)
        opt = bench.make_adam(model.parameters(), "for-loop", capturable=True)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

        if graphs:
            replay = bench.cuda_graphed(step, dev, warmup=3)  # capturing runs no kernel
        else:
            replay = step
            for _ in range(3):
                step()
        for _ in range(2):
            replay()
        torch.cuda.synchronize()
        return [p.detach().cpu() for p in model.parameters()]

    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b)


def test_models_list_runs_the_eager_baseline_first() -> None:
    vs = parse_models("tagf,tagf:bf16,tagf_eager,rjca:compile", compile=False)
    assert [v.spec for v in vs] == ["tagf", "tagf:bf16", "tagf_eager", "rjca:compile"]
    assert [v.spec for v in run_order(vs)] == ["tagf_eager", "tagf", "tagf:bf16", "rjca:compile"]


# --- bytes ------------------------------------------------------------------------------------


def test_byte_counter_matches_a_hand_count() -> None:
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    x, y = torch.randn(10), torch.randn(10)
    with ByteCounter() as bc:
        c = a @ b  # mm: reads 3*4 + 4*5 floats, writes 3*5
        ct = c.t()  # views: no traffic
        _ = ct.transpose(0, 1).view(15).expand(2, 15)
        _ = a.detach()
        _ = (c[0], c[:, 1:3], c.unsqueeze(0), c.narrow(1, 0, 2))  # select, slice, ...: views
        h = a.to(torch.bfloat16)  # _to_copy: reads 12 floats, writes 12 bf16
        x.add_(y)  # in place: reads x and y, writes x
    mm = (3 * 4 + 4 * 5 + 3 * 5) * 4
    cast = 12 * 4 + 12 * 2
    add = (10 + 10 + 10) * 4
    assert bc.total == mm + cast + add
    assert dict(bc.by_op) == {"mm": mm, "_to_copy": cast, "add_": add}
    assert h.dtype == torch.bfloat16


def test_byte_counter_counts_lists_of_tensors() -> None:
    xs = [torch.ones(4), torch.ones(6)]
    with ByteCounter() as bc:
        torch._foreach_mul_(xs, 2.0)  # Adam's foreach ops take tensor lists
    assert bc.total == 2 * (4 + 6) * 4


# --- busy time --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("intervals", "want"),
    [
        ([], 0.0),
        ([(0, 10), (20, 25)], 15.0),  # disjoint
        ([(0, 10), (5, 15), (20, 25)], 20.0),  # overlapping
        ([(0, 10), (2, 3), (4, 9)], 10.0),  # nested
        ([(5, 10), (0, 5)], 10.0),  # touching, unsorted
        ([(30, 40), (0, 10), (35, 50), (8, 12)], 32.0),
    ],
)
def test_union_length(intervals, want) -> None:
    assert union_length(intervals) == pytest.approx(want)


def _ev(name, start, end, device=DeviceType.CUDA, activity="kernel", self_us=None, **kw):
    return SimpleNamespace(
        name=name,
        time_range=SimpleNamespace(start=start, end=end),
        device_type=device,
        activity_type=activity,
        is_user_annotation=kw.get(
            "annotation", activity in ("user_annotation", "gpu_user_annotation")
        ),
        is_async=False,
        self_cpu_time_total=(end - start) if self_us is None else self_us,
        thread=kw.get("thread", 1),
    )


def test_profile_summary_unions_cuda_kernels() -> None:
    events = [
        _ev("gemm", 0, 100),
        _ev("gemm", 150, 250),
        _ev("elementwise", 50, 120),  # overlaps the first gemm: counted once
        _ev("Memcpy DtoD", 300, 310, activity="gpu_memcpy"),
        _ev("ProfilerStep#1", 0, 1000, activity="gpu_user_annotation", annotation=False),
        _ev("step", 0, 2000, activity=None, annotation=True),  # torch without activity_type
        _ev("aten::mm", 0, 40, device=DeviceType.CPU, activity="cpu_op"),
        _ev("aten::addmm", 30, 60, device=DeviceType.CPU, activity="cpu_op", thread=2),
        _ev("Optimizer.step", 0, 900, device=DeviceType.CPU, activity="user_annotation"),
    ]
    s = summarize_profile(events, steps=2, wall_s=1e-3)
    assert s["wall_ms"] == pytest.approx(0.5)
    assert s["device_busy_ms"] == pytest.approx((120 + 100 + 10) / 1e3 / 2)
    assert s["device_busy_pct"] == pytest.approx(100 * 0.115 / 0.5)
    assert s["host_ops_ms"] == pytest.approx(60 / 1e3 / 2)
    assert s["n_device_events"] == 4
    assert [(k["name"], k["calls"]) for k in s["top"]] == [
        ("gemm", 2),
        ("elementwise", 1),
        ("Memcpy DtoD", 1),
    ]
    assert s["top"][0]["self_ms"] == pytest.approx(0.2)


def test_profile_summary_on_the_cpu_has_no_device_busy() -> None:
    events = [
        _ev("aten::linear", 0, 50, device=DeviceType.CPU, activity="cpu_op", self_us=5),
        _ev("aten::addmm", 5, 50, device=DeviceType.CPU, activity="cpu_op", self_us=45),
        _ev("aten::relu", 60, 70, device=DeviceType.CPU, activity="cpu_op"),
    ]
    s = summarize_profile(events, steps=1, wall_s=100e-6)
    assert s["device_busy_ms"] is None and s["device_busy_pct"] is None
    assert s["host_ops_ms"] == pytest.approx(0.06)
    assert s["host_ops_pct"] == pytest.approx(60.0)
    assert [k["name"] for k in s["top"]] == ["aten::addmm", "aten::relu", "aten::linear"]


def test_profile_steps_reads_real_profiler_events() -> None:
    a = torch.randn(64, 64)

    def step():
        for _ in range(3):
            torch.mm(a, a)

    s = bench.profile_steps(step, torch.device("cpu"), steps=2)
    assert s["device_busy_ms"] is None
    assert 0 < s["host_ops_ms"] <= s["wall_ms"]
    mm = next(k for k in s["top"] if k["name"] == "aten::mm")
    assert mm["calls"] == 6


# --- roofline ---------------------------------------------------------------------------------


def test_roofline_arithmetic() -> None:
    r = roofline(1e12, 1e9, 1000.0, 2000.0)  # 1 ms of compute, 0.5 ms of memory
    assert r == pytest.approx(
        {"roofline_ms": 1.0, "compute_ms": 1.0, "memory_ms": 0.5, "bound": "compute"}
    )
    r = roofline(1e9, 8e9, 1000.0, 2000.0)  # 0.001 ms of compute, 4 ms of memory
    assert r["bound"] == "memory" and r["roofline_ms"] == pytest.approx(4.0)
    assert roofline_pct(1.0, 4.0) == pytest.approx(25.0)
    assert roofline_pct(None, 4.0) is None
    assert roofline(1e12, 1e9, None, None) is None
    only = roofline(1e12, 1e9, None, 500.0)
    assert only["bound"] == "memory" and only["roofline_ms"] == pytest.approx(2.0)


def test_peaks_by_device_name_and_precision() -> None:
    h100 = pick_peaks("cuda", "NVIDIA H100 80GB HBM3", bf16=True)
    assert (h100["tflops"], h100["gbs"]) == (989.0, 3350.0)
    assert "H100 SXM5 datasheet" in h100["source"]
    assert pick_peaks("cuda", "NVIDIA H100 80GB HBM3", bf16=False)["tflops"] == 67.0
    h200 = pick_peaks("cuda", "NVIDIA H200", bf16=True)
    assert (h200["tflops"], h200["gbs"]) == (989.0, 4800.0)
    assert pick_peaks("cuda", "NVIDIA H100 PCIe", bf16=True)["gbs"] == 2000.0
    unknown = pick_peaks("cuda", "NVIDIA A10", bf16=True)
    assert unknown == {"tflops": None, "gbs": None, "source": None}
    assert pick_peaks("cpu", "cpu H100", bf16=True)["tflops"] is None  # CPU: flags only
    cpu = pick_peaks("cpu", "cpu", bf16=False, peak_tflops=2.0, peak_gbs=50.0)
    assert (cpu["tflops"], cpu["gbs"]) == (2.0, 50.0)
    over = pick_peaks("cuda", "NVIDIA H100 80GB HBM3", bf16=True, peak_gbs=3000.0)
    assert (over["tflops"], over["gbs"]) == (989.0, 3000.0)


# --- one row end to end -----------------------------------------------------------------------


def test_measure_one_tiny_row_with_profile_and_roofline() -> None:
    args = argparse.Namespace(
        device="cpu",
        encoders="none",
        mode="faithful",
        batch=1,
        length=8,
        warmup=1,
        repeats=1,
        profile=True,
        profile_steps=2,
        peak_tflops=1.0,
        peak_gbs=10.0,
    )
    row = bench.measure(args, parse_variant("rjca"))
    assert row["variant"] == "rjca" and row["precision"] == "fp32" and row["compile"] is False
    assert row["train_gflop"] > 0 and row["train_gb"] > 0
    want = max(row["train_gflop"] * 1e9 / 1e12, row["train_gb"] * 1e9 / 10e9) * 1e3
    assert row["roofline_ms"] == pytest.approx(want)
    assert row["roofline_pct"] == pytest.approx(100 * want / row["train_step_ms"])
    assert row["profile"]["steps"] == 2 and row["profile"]["device_busy_ms"] is None
    row["vs_eager"] = 2.0
    line = bench.table_row(row)
    assert line.count("|") == len(bench.COLS) + 1 and "2.00x" in line and "fp32" in line
    text = "\n".join(bench.profile_section([row]))
    assert "n/a" in text and "top-5 aten ops" in text


def test_cuda_rows_render_with_busy_time_roofline_and_tf32_note() -> None:
    prof = summarize_profile([_ev("gemm", 0, 400), _ev("relu", 300, 500)], steps=2, wall_s=1e-3)
    row = {
        "model": "tagf",
        "variant": "tagf",
        "precision": "fp32",
        "bf16": False,
        "compile": False,
        "params": 10,
        "train_step_ms": 0.5,
        "vs_eager": 3.25,
        "train_gflop": 1.0,
        "train_gb": 2.0,
        "roofline_ms": 0.25,
        "roofline_pct": 50.0,
        "roofline_bound": "memory",
        "peak_tflops": 67.0,
        "peak_gbs": 3350.0,
        "peak_source": "H100 fp32 spec, NVIDIA H100 SXM5 datasheet",
        "tf32": {"matmul": False, "cudnn": True},
        "profile": prof,
    }
    line = bench.table_row(row)
    assert "3.25x" in line and "50.0% (mem)" in line and "| fp32 | eager |" in line
    text = "\n".join(bench.profile_section([row]))
    assert "union of CUDA kernel" in text
    # busy 0.25 ms of 0.5 ms wall per step; the timed step is 0.5 ms too
    assert "| 0.25 | 50.0% | 50.0% |" in text and "top-5 CUDA kernels" in text
    foot = "\n".join(bench.footer([row]))
    assert "H100 SXM5 datasheet" in foot and "cuDNN True" in foot and "792 TFLOP/s" in foot


# --- rounds -----------------------------------------------------------------------------------


def _measured(step_ms: float, gflop: float | None = 1.0) -> dict:
    return {
        "model": "tagf",
        "variant": "tagf",
        "precision": "fp32",
        "bf16": False,
        "compile": False,
        "params": 10,
        "train_step_ms": step_ms,
        "train_windows_s": 1e3 / step_ms,
        "train_frames_s": 3e5 / step_ms,
        "infer_windows_s": 2e3 / step_ms,
        "infer_frames_s": 6e5 / step_ms,
        "peak_mem_mb": step_ms,
        "train_gflop": gflop,
        "train_gb": None if gflop is None else 2.0,
        "roofline_ms": None,
    }


def test_rounds_combine_into_medians_ranges_and_side_by_side_ratios() -> None:
    """Timings: the median over the rounds with their range; the ratio to the eager row: the
    median of the per-round ratios (rows of one round ran side by side), with its range."""
    rounds = [_measured(100.0), _measured(300.0, None), _measured(200.0, None)]
    row = bench.combine(rounds, [2.0, 1.5, None])
    assert row["train_step_ms"] == 200.0 and row["train_step_range"] == (100.0, 300.0)
    assert row["infer_frames_s"] == pytest.approx(6e5 / 200.0)
    assert row["peak_mem_mb"] == 300.0  # the largest
    assert row["train_gflop"] == 1.0  # counted in the first round
    assert row["train_gflops_s"] == pytest.approx(1.0 / 0.2)
    assert row["vs_eager"] == pytest.approx(1.75) and row["vs_eager_range"] == (1.5, 2.0)
    line = bench.table_row(row)
    assert "| 200.0 | 100.0-300.0 | 1.75x (1.50-2.00) |" in line
    assert line.count("|") == len(bench.COLS) + 1
    one = bench.combine([_measured(50.0)], [None])
    assert one["vs_eager"] is None and one["vs_eager_range"] is None
    assert one["train_step_range"] == (50.0, 50.0)


def test_adam_implementations() -> None:
    p = [torch.nn.Parameter(torch.randn(3))]
    assert bench.make_adam(p, "for-loop").defaults["foreach"] is False
    assert bench.make_adam(p, "foreach").defaults["foreach"] is True
    assert bench.make_adam(p, "fused").defaults["fused"] is True


def test_rows_run_interleaved_in_rounds_with_counts_once(monkeypatch, capsys) -> None:
    """--rounds 2: the row list runs twice in turn, eager row first in each round; FLOPs and
    bytes are asked for in the first round only; ratios are per round."""
    calls = []

    def fake_child(args, var, counts=True):
        calls.append((var.spec, counts))
        ms = {"tagf_eager": 300.0, "tagf": 100.0 if len(calls) <= 2 else 150.0}[var.spec]
        return _measured(ms, 1.0 if counts else None)

    monkeypatch.setattr(bench, "run_child", fake_child)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--models", "tagf,tagf_eager", "--rounds", "2"])
    bench.main()
    assert calls == [("tagf_eager", True), ("tagf", True), ("tagf_eager", False), ("tagf", False)]
    out = capsys.readouterr().out
    assert "# round 1/2: tagf_eager 300.0 ms (1.00x), tagf 100.0 ms (3.00x)" in out
    assert "# round 2/2: tagf_eager 300.0 ms (1.00x), tagf 150.0 ms (2.00x)" in out
    assert "| 2.50x (2.00-3.00) |" in out
