"""`make gpu-check`'s machinery on the CPU: results redirected away from the committed ones, a run's lines filed
once, and a check that goes on past a failed or hung stage, skips what the budget cannot hold, and ends non-zero
with at most 8 result files. (The real stages run in CI as `make gpu-check`, the smoke mode.)"""

from __future__ import annotations

import json

import pytest

from benchmarks import common, report


def test_results_go_where_stenvan_bench_results_points(tmp_path, monkeypatch):
    committed = common.RESULTS_DIR / "redirect_probe.jsonl"
    monkeypatch.setenv(common.RESULTS_ENV, str(tmp_path))
    try:
        path = common.append_results("redirect_probe", [{"variant": "a", "value": 1}])
        assert path == tmp_path / "redirect_probe.jsonl" and not committed.exists()
    finally:
        committed.unlink(missing_ok=True)  # the old code wrote here: leave the repository clean either way
    row = json.loads(path.read_text())
    assert row["benchmark"] == "redirect_probe" and row["value"] == 1


def test_report_files_a_runs_lines_once_and_writes_beside_them(tmp_path):
    source = tmp_path / "run.jsonl"
    lines = [{"benchmark": "eval", "variant": "x", "device": "d", "time": "t1", "frames_per_s": 5.0},
             {"benchmark": "gpu_check", "variant": "tests", "device": "d", "time": "t1", "status": "pass"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in lines))
    folder = tmp_path / "results"
    report.main(["--results-dir", str(folder), "--add", str(source)])
    report.main(["--results-dir", str(folder), "--add", str(source)])  # again: nothing added twice
    assert [json.loads(x)["variant"] for x in (folder / "eval.jsonl").read_text().splitlines()] == ["x"]
    assert len((folder / "gpu_check.jsonl").read_text().splitlines()) == 1
    text = (folder / "RESULTS.md").read_text()  # not benchmarks/RESULTS.md: another results folder
    assert "## `gpu_check` (`make gpu-check`)" in text and "| d | tests | " in text


def test_gpu_check_goes_on_past_failed_stages_and_exits_non_zero(tmp_path, monkeypatch):
    from benchmarks import gpu_check, gpu_check_stages
    from benchmarks.gpu_check_run import Outcome, failed, py, run_process
    from benchmarks.gpu_check_stages import Stage

    def command(name: str, code: str):
        def run(ctx, timeout):
            exit_code, _ = run_process(ctx, name, py(ctx, "-c", code), timeout)
            return Outcome("pass", "ran") if exit_code == 0 else failed(exit_code, ctx, name)
        return run

    writes_a_result = ("from benchmarks.common import append_results; "
                       "append_results('probe', [{'variant': 'from a stage', 'device': 'cpu'}])")
    monkeypatch.setattr(gpu_check_stages, "BACKGROUND", [Stage("dataset", "background", 0.5, 0,
                                                               command("dataset", writes_a_result))])
    monkeypatch.setattr(gpu_check_stages, "STAGES", [
        Stage("fails", "exits 3", 0.2, 3, command("fails", "import sys; print('boom'); sys.exit(3)")),
        Stage("hangs", "outlives its time", 0.1, 3, command("hangs", "import time; time.sleep(120)")),
        Stage("passes", "exits 0", 0.2, 3, command("passes", "print('fine')")),
        # Needs more than the whole budget: skipped, and the time it would need is no reason to skip the ones before.
        Stage("too_long", "needs more than the budget", 0.5, 1000, command("too_long", "pass")),
    ])
    out = tmp_path / "out"
    code = gpu_check.main(["--smoke", "--minutes", "0.2", "--out", str(out), "--work", str(tmp_path / "work")])
    assert code == 1
    summary = json.loads((out / "summary.json").read_text())
    status = {name: stage["status"] for name, stage in summary["stages"].items()}
    assert status == {"dataset": "pass", "fails": "fail", "hangs": "fail", "passes": "pass", "too_long": "skipped"}
    assert "exit code 3" in summary["stages"]["fails"]["detail"] and "boom" in summary["stages"]["fails"]["detail"]
    assert "time limit" in summary["stages"]["hangs"]["detail"]
    assert "budget" in summary["stages"]["too_long"]["detail"]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {"probe", "gpu_check"} <= {r["benchmark"] for r in results}  # a stage's lines came back, not committed
    assert not (common.RESULTS_DIR / "probe.jsonl").exists()
    assert "| fails | FAIL |" in (out / "summary.md").read_text()


def test_gpu_mode_needs_cuda(capsys, monkeypatch):
    import torch

    from benchmarks import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--gpu"])
    assert exit_info.value.code == 2 and "no CUDA device" in capsys.readouterr().err


def test_a_missing_package_stops_gpu_check_at_once_in_one_line(tmp_path, capsys, monkeypatch):
    from benchmarks import gpu_check

    assert gpu_check.preflight()[0] == []  # this machine has what the stages need
    real = gpu_check.find_spec
    monkeypatch.setattr(gpu_check, "find_spec", lambda name: None if name in ("nvidia.dali", "triton") else real(name))
    out = tmp_path / "out"
    assert gpu_check.main(["--smoke", "--out", str(out), "--work", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu-check: missing package(s): nvidia-dali-cuda130"), err
    assert not out.exists() and not (tmp_path / "work").exists()  # nothing started


def test_the_tests_stage_reads_pytest_summaries_of_any_length():
    from benchmarks.gpu_check_stages import pytest_counts

    assert pytest_counts("") == {} and pytest_counts("[exit 1 after 0.3 s]") == {}
    assert pytest_counts("ImportError: no module named x\n[exit 4 after 1.0 s]") == {}
    assert pytest_counts("3 passed, 1 skipped, 2 deselected in 12.31s\n[exit 0 after 13.0 s]") == \
        {"passed": 3, "skipped": 1, "deselected": 2}
    log = ("FAILED tests/test_x.py::test_y - assert 1 passed in 0s\n"
           "========= 1 failed, 20 passed, 1 error in 301.20s (0:05:01) =========\n[exit 1 after 302.0 s]\n")
    assert pytest_counts(log) == {"failed": 1, "passed": 20, "error": 1}


def test_the_loader_benchmark_measures_hardware_decoder_shares_on_gpus_only(tmp_path, capsys):
    from benchmarks import loader

    for args, message in ((["--hw-decoder-load", "0"], "the hardware JPEG decoder is a GPU's"),
                          (["--device", "cuda", "--hw-decoder-load", "1.5"], "shares run from 0 to 1")):
        with pytest.raises(SystemExit) as exit_info:
            loader.main(["--data", str(tmp_path), "--backend", "dali", *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
