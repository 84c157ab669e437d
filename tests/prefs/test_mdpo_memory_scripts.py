"""bench/mdpo_memory.py and bench/mdpo_memory_probe.py end to end on the tiny Gemma 2 on the CPU.

Both drive the device runs of issue 6; here they must run, write their results, and start from the
policy = reference point: the first step's DPO loss is log 2 (the reference log-probs come from the same
compiled layers as the policy's).
"""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import load_bench_script

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_cpu_thread")]


def test_mdpo_memory_two_pass_contender_runs_from_log_2(tmp_path):
    memory = load_bench_script("mdpo_memory")
    out = tmp_path / "memory.json"
    assert memory.main(["--tiny", "--device", "cpu", "--contenders", "lmforge_two_pass2_compiled",
                        "--warmup", "1", "--steps", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())["results"]["lmforge_two_pass2_compiled"]
    assert result["first_step_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert result["gradient_checkpointing_active"] is True
    assert len(result["step_times_s"]) == 1


def test_mdpo_memory_probe_runs_its_phases(tmp_path):
    probe = load_bench_script("mdpo_memory_probe")
    assert probe.main(["--tiny", "--out-dir", str(tmp_path), "--steps", "1", "base"]) == 0
    [entry] = json.loads((tmp_path / "probe.json").read_text())
    assert "error" not in entry, entry.get("error")
    assert entry["rows"] == 2 and len(entry["step_times_s"]) == 1 and entry["median_s"] > 0
