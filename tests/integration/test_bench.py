"""tools/bench.py: a smoke run with tiny counts, and its target arithmetic.

The smoke run benchmarks one case once against selsmtp and whichever peers this machine
has (aiosmtpd when importable, the standard library's smtpd on Python 3.11 and older,
Postfix's smtp-sink when installed), and checks the shape of the JSON, Markdown and SVG
it writes. The numbers themselves are not judged: this machine may be busy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH = REPO_ROOT / "tools" / "bench.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses looks the module up by name
    spec.loader.exec_module(module)
    return module


def installed_servers() -> list[str]:
    servers = ["selsmtp"]
    if importlib.util.find_spec("aiosmtpd") is not None:
        servers.append("aiosmtpd")
    if sys.version_info < (3, 12):
        servers.append("smtpd")
    if shutil.which("smtp-sink") or os.access("/usr/sbin/smtp-sink", os.X_OK):
        servers.append("smtp-sink")
    return servers


def test_smoke_run_writes_json_markdown_and_svg(tmp_path: Path) -> None:
    servers = [*installed_servers(), "selsmtp-warning"]
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--cases", "ka20", "--clients", "flood",
         "--servers", ",".join(servers), "--repeat", "1", "--scale", "0.01",
         "--idle-connections", "50", "--idle-tls-connections", "20", "--greeting-samples", "1",
         "--json", str(out / "bench.json"), "--markdown", str(out / "bench.md"),
         "--plot", str(out / "bench.svg")],
        capture_output=True,
        timeout=60,
        cwd=out,
    )  # fmt: skip
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == 0, stderr
    result: dict[str, Any] = json.loads((out / "bench.json").read_text())

    assert set(result) == {"meta", "summary", "idle", "idle_tls", "greeting", "runs", "targets"}
    meta = result["meta"]
    assert meta["servers_run"] == servers
    assert meta["clients"] == ["flood"]
    assert meta["repeat"] == 1
    assert meta["interrupted"] is False
    runs = result["runs"]
    assert [run["server"] for run in runs] == servers
    for run in runs:
        assert run["ok"] is True, json.dumps(run)
        assert run["case"] == "ka20" and run["client"] == "flood" and run["rep"] == 0
        assert run["acknowledged"] == run["messages"] == run["stored"] == 100
        assert run["messages_per_s"] > 0
        assert run["server_cpu_per_10k_s"] is None or run["server_cpu_per_10k_s"] >= 0
    cells = result["summary"]["ka20"]["flood"]
    assert set(cells) == set(servers)
    for cell in cells.values():
        assert cell["ok_runs"] == cell["runs"] == 1
        assert cell["min"] == cell["median"] == cell["max"] > 0
    if "aiosmtpd" in servers:
        assert cells["aiosmtpd"]["ratio_vs_aiosmtpd"] == 1.0
        assert cells["selsmtp"]["ratio_vs_aiosmtpd"] > 0
        ratio_rows = [t for t in result["targets"] if "aiosmtpd" in t["target"]]
        assert len(ratio_rows) == 1 and ratio_rows[0]["result"] in ("pass", "miss")

    idle = result["idle"]
    assert set(idle) == {s for s in servers if s not in ("selsmtp-nofsync", "selsmtp-warning")}
    for entry in idle.values():
        assert entry["ok"] is True, entry
        assert entry["held"] == 50
        assert entry["rss_after_bytes"] > 0
    idle_tls = result["idle_tls"]  # the same server with TLS on: plain beside STARTTLS
    assert set(idle_tls) == {s for s in ("selsmtp", "aiosmtpd") if s in servers}
    for pair in idle_tls.values():
        assert set(pair) == {"plain", "starttls"}
        for entry in pair.values():
            assert entry["ok"] is True, entry
            assert entry["held"] == entry["connections"] == 20
            assert entry["rss_after_bytes"] > 0
        assert pair["plain"]["tls"] is False and pair["starttls"]["tls"] is True
    greeting = result["greeting"]
    assert set(greeting) == {*idle, "python-floor"}
    for entry in greeting.values():
        assert len(entry["samples_ms"]) == 1 and entry["median_ms"] > 0, entry

    names = {t["target"] for t in result["targets"]}
    assert any("idle connection" in name for name in names)
    assert any("first greeting" in name for name in names)
    for target in result["targets"]:
        assert target["result"] in ("pass", "miss", "n/a")

    markdown = (out / "bench.md").read_text()
    assert markdown in done.stdout.decode()
    assert "### Throughput (messages/s)" in markdown
    assert "| case | client | selsmtp |" in markdown
    assert "| 1 KiB, 20 kept-open sessions | flood |" in markdown
    assert "### Memory per idle connection, plain and after STARTTLS" in markdown
    assert "| selsmtp | 20 |" in markdown
    assert (
        "### Targets" in markdown and "| target | client | measured | result | margin |" in markdown
    )
    svg = (out / "bench.svg").read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert "1 KiB, 20 kept-open sessions" in svg
    assert not Path(meta["tmp"]).exists(), "its temporary folder is left behind"


def test_a_tls_case_runs_only_the_servers_that_do_tls(tmp_path: Path) -> None:
    # selsmtp at --log-level warning is not one of them: its cell is a dash, not a
    # failed run (nor a "Failed runs" line that sends a reader to the JSON).
    done = subprocess.run(
        [sys.executable, str(BENCH), "--cases", "tlsconn20", "--clients", "flood",
         "--servers", "selsmtp,selsmtp-warning", "--repeat", "2", "--scale", "0.01",
         "--idle-connections", "0", "--idle-tls-connections", "0", "--greeting-samples", "0",
         "--json", str(tmp_path / "bench.json")],
        capture_output=True,
        timeout=60,
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    result: dict[str, Any] = json.loads((tmp_path / "bench.json").read_text())
    assert [(run["server"], run["ok"]) for run in result["runs"]] == [("selsmtp", True)] * 2
    stdout = done.stdout.decode()
    assert "Failed runs" not in stdout
    row = next(line for line in stdout.splitlines() if "one STARTTLS connection" in line)
    assert row.rstrip().endswith("| \N{EN DASH} |"), row


def test_targets_pass_and_miss_with_margins() -> None:
    bench = load_bench()
    x = bench.TIMES

    def run(server: str, rate: float, rep: int, cpu: float = 0.5) -> dict[str, Any]:
        return {"case": "ka200", "client": "flood", "server": server, "rep": rep, "ok": True,
                "messages_per_s": rate, "server_cpu_per_10k_s": cpu,
                "client_cpu_percent": 50.0}  # fmt: skip

    runs = [
        run("selsmtp", 7000, 0), run("selsmtp", 6000, 1), run("selsmtp", 6500, 2, 1.5),
        run("aiosmtpd", 1000, 0), run("aiosmtpd", 1100, 1), run("aiosmtpd", 1050, 2),
        run("smtp-sink", 6000, 0), run("smtp-sink", 5000, 1),
        run("selsmtp-nofsync", 7000, 0), run("selsmtp-nofsync", 7000, 1),
    ]  # fmt: skip
    table = bench.summarize(runs)
    cell = table["ka200"]["flood"]["selsmtp"]
    assert (cell["median"], cell["min"], cell["max"]) == (6500, 6000, 7000)
    assert cell["ratio_vs_aiosmtpd"] == round(6500 / 1050, 3)
    idle = {"selsmtp": {"connections": 10000, "held": 10000, "ok": True,
                        "bytes_per_connection": 2048.0, "rss_before_bytes": 20 << 20,
                        "rss_after_bytes": 40 << 20}}  # fmt: skip
    greeting = {"selsmtp": {"median_ms": 30.0, "min_ms": 29.0, "max_ms": 31.0,
                            "samples_ms": [29.0, 30.0, 31.0]}}  # fmt: skip
    targets = {(t["target"], t["client"]): t for t in bench.evaluate_targets(table, idle, greeting)}
    six = targets[(f"1 KiB, 200 kept-open sessions: selsmtp ≥ 6{x} aiosmtpd", "flood")]
    assert six["result"] == "pass" and six["margin"] == "3.2% above"
    assert six["shown"] == f"6.19{x} (5.45{bench.DASH}7.00)"  # the per-repetition ratios' range
    sink = targets[(f"1 KiB, 200 kept-open sessions: selsmtp ≥ 1.3{x} smtp-sink -D", "flood")]
    assert sink["result"] == "miss" and sink["margin"] == "9.1% short"  # 6500 / 5500 = 1.18
    durable = targets[("1 KiB, 200 kept-open sessions: durable within 10% of --no-fsync", "flood")]
    assert durable["result"] == "pass" and durable["shown"].startswith(f"0.93{x}")
    cpu = targets[
        ("1 KiB, 200 kept-open sessions: server CPU per 10,000 messages ≤ 1.0 s", "flood")
    ]
    assert cpu["result"] == "pass" and cpu["measured"] == 0.5
    rss = targets[("RSS per idle connection at 10,000 ≤ 1 KiB", "-")]
    assert rss["result"] == "miss" and rss["margin"] == "100.0% over"
    start = targets[("start to first greeting ≤ 40 ms", "-")]
    assert start["result"] == "pass" and start["margin"] == "25.0% under"
    assert "### Targets" in bench.markdown(
        {"meta": {"started": "now", "command": "bench", "cpus": 2, "platform": "p",
                  "python": "3", "tmp_fs": "ext4", "loadavg_start": [], "loadavg_end": [],
                  "server_cpu": 0, "client_cpu": 1, "selsmtp_source": "tree", "repeat": 3,
                  "servers_run": ["selsmtp", "aiosmtpd"], "servers": {}},
         "summary": table, "idle": idle, "greeting": greeting, "runs": runs,
         "targets": list(targets.values())}
    )  # fmt: skip
