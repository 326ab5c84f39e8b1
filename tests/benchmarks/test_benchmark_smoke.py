"""The GPU benchmarks run end to end on CPU with tiny shapes, and their JSON holds what the
GPU run will be read for: every raw number, and ratios that follow from them."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{script}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--model", "random:tiny",
           "--device", "cpu", "--adapter-dir", str(tmp_path / "adapters"), "--out", str(out),
           *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "partial" not in data
    return data


def lora_switch() -> bool:
    from dataclasses import fields

    from punica_core import EngineConfig
    return "enable_lora" in {f.name for f in fields(EngineConfig)}


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def close(a, b) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def test_engine_gpu_on_cpu(tmp_path):
    d = run("engine_gpu", tmp_path, "--batch", "4", "--prompt-len", "8", "--new-tokens", "6",
            "--rounds", "1", "--peft-new-tokens", "2", "--many-adapters", "12", "--slots", "3",
            "--host-cache", "4", "--distinct-files", "3", "--waves", "2", "--many-rounds", "2")
    assert d["torch"] and d["device"].startswith("cpu") and d["dtype"] == "float32"
    ours, ratios, bw = d["ours"], d["ratios"], d["copy_bandwidth"]
    assert positive(bw["gb_per_s"]) and close(bw["gb_per_s"],
                                              bw["bytes_counted"] / bw["ms_median"] / 1e6)
    mixes = {"none", "identical", "distinct", "uniform", "skewed"}
    if lora_switch():
        mixes.add("lora_off")
        assert close(ratios["none_vs_lora_off_tokens_per_s"],
                     ours["none"]["tokens_per_s"] / ours["lora_off"]["tokens_per_s"])
        assert close(ratios["none_vs_lora_off_decode_step_p50"], ours["none"]
                     ["decode_step_ms_p50"] / ours["lora_off"]["decode_step_ms_p50"])
    else:
        assert any("lora_off skipped" in n for n in d["notes"])
    assert set(ours) == mixes
    med = d["ratios_median_of_rounds"]      # one round: the median is that round's ratio
    assert close(med["identical_vs_none"]["median"], ratios["identical_vs_none"])
    assert med["distinct_vs_identical"]["per_round"] == [med["distinct_vs_identical"]["median"]]
    for mix, r in ours.items():
        assert positive(r["tokens_per_s"]) and positive(r["decode_step_ms_p50"]), mix
        assert r["tokens"] == 4 * 6 and r["decode_step_ms_p99"] >= r["decode_step_ms_p50"]
        assert close(r["roofline_fraction"], r["decode_step_roofline_ms"]
                     / r["decode_step_ms_p50"])
        total = r["bytes_weights"] + r["bytes_kv"] + r["bytes_adapters"]
        assert close(r["decode_step_roofline_ms"], total / (bw["gb_per_s"] * 1e9) * 1e3)
    assert ours["distinct"]["distinct_adapters"] == 4 and ours["none"]["bytes_adapters"] == 0
    assert ours["distinct"]["bytes_adapters"] == 4 * d["roofline"]["adapter_bytes_each"]
    assert close(ratios["distinct_lora_added_vs_adapter_read"],
                 ours["distinct"]["lora_added_ms_p50"] / d["distinct_adapter_bytes_read_ms"])
    assert close(ratios["distinct_vs_peft_mixed"], ours["distinct"]["tokens_per_s"]
                 / d["baseline"]["peft_mixed"]["tokens_per_s"])
    assert d["engine_config"]["max_lora_rank"] == 16
    m = d["many_adapters"]
    assert m["registered_adapters"] == 12 and m["distinct_files"] == 3 and m["zipf_alpha"] == 1
    assert m["many"]["requests"] == m["resident"]["requests"] == 8
    assert m["many"]["tokens"] == m["resident"]["tokens"]      # the same request sequence
    assert m["resident"]["loads"] == 0 and m["many"]["loads"] >= m["working_set"] > 3
    assert m["many"]["evictions"] > 0 and m["many"]["host_parses"] > 0
    assert close(ratios["many_vs_resident"],
                 m["many"]["tokens_per_s"] / m["resident"]["tokens_per_s"])
    warm = m["many_warm_host"]
    assert warm["tokens"] == m["resident"]["tokens"]
    assert warm["adapters_not_in_host_cache_at_start"] == 0
    assert warm["host_parses"] == 0 and warm["evictions"] > 0   # slot churn only, no disk
    assert close(ratios["many_warm_host_vs_resident"],
                 warm["tokens_per_s"] / m["resident"]["tokens_per_s"])
    assert len(m["rounds"]) == 2 and "resident_untimed_first_pass" in m["rounds"][0] \
        and "resident_untimed_first_pass" not in m["rounds"][1]
    for key, label in (("many_vs_resident", "many"), ("many_warm_host_vs_resident",
                                                        "many_warm_host")):
        per = [r[label]["tokens_per_s"] / r["resident"]["tokens_per_s"] for r in m["rounds"]]
        med = m["ratios_median_of_rounds"][key]
        assert med["per_round"] == per and close(med["median"], (per[0] + per[1]) / 2)
        assert close(ratios[key], per[-1])
    assert "private_apis_used" not in d      # lazy registration and store counters are public


def test_adapter_loading_on_cpu(tmp_path):
    d = run("adapter_loading", tmp_path, "--batch", "4", "--prompt-len", "8", "--reps", "3",
            "--fresh", "2", "--blocks", "2", "--block-steps", "3", "--warm-steps", "1")
    assert d["torch"] and d["device"].startswith("cpu")
    assert d["pinned_h2d"] is None and any("CUDA only" in n for n in d["notes"])
    h = d["host_to_slot"]
    assert len(h["load_ms_each"]) == 3 and all(positive(x) for x in h["load_ms_each"])
    assert h["host_dtype"] == "torch.float32" and h["host_bytes"] == h["slot_bytes"]  # fp32
    assert close(h["gb_per_s_host_bytes"], h["host_bytes"] / h["load_ms_median"] / 1e6)
    disk = d["disk_to_slot"]
    assert len(disk["files"]) == 2 and disk["goal_ms"] == 100
    for f in disk["files"]:
        for k in ("read_cold_ms", "register_cold_ms", "slot_copy_cold_ms", "e2e_cold_ms",
                  "e2e_warm_ms", "parse_validate_pin_ms"):
            assert positive(f[k]), k
        assert f["e2e_cold_ms"] >= f["register_cold_ms"]
    assert disk["meets_goal_warm"] == (disk["e2e_warm_ms_median"] <= 100)
    s = d["no_stall"]
    assert len(s["step_ms"]["with"]) == len(s["step_ms"]["without"]) == 2 * 3
    assert s["loads"] == 2 * 3             # one per step of the two "with" blocks
    assert close(s["step_p50_with_vs_without"],
                 s["step_ms_p50_with"] / s["step_ms_p50_without"])
    assert d["ratios"]["no_stall_step_p50_with_vs_without"] == s["step_p50_with_vs_without"]
    stacked = d["disk_to_slot_device_stacked"]
    assert len(stacked["files"]) == 2 and all(positive(f["e2e_cold_ms"]) for f in stacked["files"])
    assert d["ratios"]["disk_to_slot_device_stacked_cold_ms"] == stacked["e2e_cold_ms_median"]


@pytest.mark.parametrize("script", ["engine_gpu", "adapter_loading"])
def test_cuda_on_a_machine_without_gpu_fails_clearly(script, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"),
                           "--model", "random:tiny", "--out", str(tmp_path / "x.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "torch sees no GPU" in proc.stderr
