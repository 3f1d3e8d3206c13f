"""bench.profile's CPU side: which cases it profiles, the ncu command of a case, and reading
ncu's CSV details page (what ncu writes with --csv --page details --log-file) into metric rows
and a line a kernel. The profiling itself needs a GPU and ncu (scripts/gpu, STEPS=profile)."""
import sys

from bench import cases, profile

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
          '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
          '"Metric Value","Rule Name","Rule Type","Rule Description"')


def metric_line(kernel_id, kernel, section, metric, unit, value):
    return (f'"{kernel_id}","4242","python3","gpu-host","{kernel}","1","7","(512, 1, 1)",'
            f'"(264, 1, 1)","0","9.0","{section}","{metric}","{unit}","{value}","","",""')


REPORT = [
    "==PROF== Connected to process 4242 (/usr/bin/python3.12)",
    "a line the profiled program printed",
    "==PROF== Profiling \"row_kernel\" - 0: 0%....50%....100% - 38 passes",
    HEADER,
    metric_line(0, "target_stats", "GPU Speed Of Light Throughput", "Duration", "us", "4.35"),
    metric_line(1, "row_kernel", "GPU Speed Of Light Throughput", "Duration", "ms", "1.57"),
    metric_line(1, "row_kernel", "Command line profiler metrics", "dram__bytes_read.sum",
                "Gbyte", "2,315.20"),
    metric_line(1, "row_kernel", "Launch Statistics", "Registers Per Thread",
                "register/thread", "64"),
    metric_line(1, "row_kernel", "Occupancy", "Theoretical Occupancy", "%", "50"),
    "==PROF== Disconnected from process 4242",
]


def test_the_report_keeps_ncus_metric_rows_and_nothing_else():
    rows = profile.read_report(REPORT)
    assert [(r["ID"], r["Kernel Name"], r["Metric Name"], r["Metric Value"]) for r in rows] == [
        ("0", "target_stats", "Duration", "4.35"), ("1", "row_kernel", "Duration", "1.57"),
        ("1", "row_kernel", "dram__bytes_read.sum", "2,315.20"),
        ("1", "row_kernel", "Registers Per Thread", "64"),
        ("1", "row_kernel", "Theoretical Occupancy", "50")]


def test_a_report_without_metrics_reads_as_none():
    assert profile.read_report(["==PROF== Connected to process 1", "==ERROR== no kernels"]) == []


def test_a_line_a_kernel_in_launch_order_with_the_summary_metrics_it_has():
    lines = profile.summary_lines(profile.read_report(REPORT))
    assert len(lines) == 2
    assert lines[0].split("\n") == ["  target_stats", "      time 4.35 us"]
    # the SUMMARY's order, ncu's units; a metric outside SUMMARY (theoretical occupancy) is left
    # to profile.csv
    assert lines[1].split("\n") == [
        "  row_kernel",
        "      time 1.57 ms; DRAM read 2,315.20 Gbyte; registers 64 register/thread"]


def test_the_default_cases_are_the_large_main_shapes():
    args = profile.parse_args([])
    assert profile.profiled_cases(args) == [case for case in cases.MAIN_CASES
                                            if case != (4096, 32000, "bf16")]
    assert args.providers == ["numba_ce-cupy-novalidate", "quack"] and args.modes == ["fwd_bwd"]
    assert profile.profiled_cases(profile.parse_args(["--dtypes", "fp32"])) == [
        (8192, 128256, "fp32")]
    assert profile.profiled_cases(profile.parse_args(
        ["--shapes", "64x1000,8x128", "--dtypes", "bf16,fp32"])) == [
        (64, 1000, "bf16"), (64, 1000, "fp32"), (8, 128, "bf16"), (8, 128, "fp32")]


def test_a_case_is_one_child_profiled_from_its_profiler_start(tmp_path):
    command = profile.ncu_command("/opt/ncu", tmp_path / "r.csv", "quack", 8192, 128256, "bf16",
                                  "fwd_bwd")
    assert command[:5] == ["/opt/ncu", "--profile-from-start", "off", "--target-processes", "all"]
    assert command[command.index("--log-file") + 1] == str(tmp_path / "r.csv")
    assert command[-8:] == [sys.executable, "-m", "bench.profile", "--child", "quack",
                            "8192x128256", "bf16", "fwd_bwd"]
    assert ",".join(profile.METRICS) in command
    assert all(section in command for section in profile.SECTIONS)
