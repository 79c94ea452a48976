#!/usr/bin/env python3
"""bench: selsmtp side by side with other SMTP servers, in one run, on this machine.

Usage (only the standard library is needed; the peers are used where installed)::

    python tools/bench.py                        # the full run: every case, 5 repetitions
    python tools/bench.py --quick                # a small run: one repetition, fewer messages
    python tools/bench.py --cases ka200,big20 --servers selsmtp,aiosmtpd --repeat 3
    python tools/bench.py --cases tls200,tlsconn20 --servers selsmtp,aiosmtpd \
        --idle-connections 0 --idle-tls-connections 500 --greeting-samples 0
    python tools/bench.py --json out.json --markdown out.md --plot out.svg

How it measures
---------------
Every run starts its server fresh, with an empty mailbox in a new temporary folder,
pinned to one core; the client (``tools/flood.py``, and Postfix's ``smtp-source`` as a
second, independent client where installed) runs pinned to another core, and so does
this script. Pinning is ``sched_setaffinity``, which is what ``taskset`` does; without
a second core it is skipped with a warning. Each case is repeated ``--repeat`` times;
within a repetition every server takes its turn at a case before the next case starts,
and the order of the servers rotates from one repetition to the next, so that drift in
the machine's speed hits all servers alike. The table shows the median and the range.

The servers:

- ``selsmtp``: ``python -m selsmtp`` as shipped (durable: fsync before every 250).
- ``selsmtp-nofsync``: the same with the hidden, unsafe ``--no-fsync``: what fsync costs.
- ``selsmtp-warning``: the same with ``--log-level warning`` (no line per connection and
  per delivery): what logging costs. Only when asked for, e.g.
  ``--cases ka1 --servers selsmtp,selsmtp-warning``: compare their CPU per 10,000 messages.
- ``aiosmtpd``: aiosmtpd with a handler that appends every message to one file and
  fsyncs before its 250 (``tools/peers.py``); needs ``pip install 'selsmtp[bench]'``.
- ``smtpd``: the standard library's ``smtpd`` with the same handler, run by a Python
  3.11 or older (found on PATH or under pyenv, or ``--smtpd-python``).
- ``smtp-sink``: Postfix's C test server, ``smtp-sink -D FILE`` (appends every message
  to a file, without fsync). ``apt-get install postfix`` brings it and ``smtp-source``.

Besides throughput it measures the server's CPU seconds per 10,000 messages (utime +
stime from ``/proc/PID/stat`` before and after the load), its resident memory per idle
connection (``VmRSS`` growth over ``--idle-connections`` connections that got their
greeting and then sit idle), and the time from spawning it to the first 220 greeting
(a client connects in a tight loop; the median of ``--greeting-samples`` starts).
For the servers that do TLS (selsmtp, aiosmtpd) the memory measure runs again with the
test certificate loaded, at ``--idle-tls-connections``: once with connections that only
got their greeting (plain) and once with connections that went through EHLO, STARTTLS,
the handshake (the certificate checked against the test CA) and EHLO again, so that the
table shows what an idle TLS session costs beside a plain one.

Delivered messages are counted from the client's report (flood's JSON; smtp-source's
exit status and elapsed time) and checked against what the mailbox holds afterwards:
flood verifies every record of a cs4410 mailbox, otherwise the records are counted.

selsmtp runs from a snapshot of this repository's working tree (its ``selsmtp`` package
and ``tools/flood.py``) taken at the start, so that a run measures one version of the
code while others edit the tree; if that server does not start, from a clean copy of
HEAD (``git archive``), and the report says so.

Results: the Markdown tables on stdout (and ``--markdown FILE``), every run and summary
in ``--json FILE``, and with ``--plot FILE.svg`` a plain SVG bar chart. The targets of
the project's benchmark issue get a pass/miss column.

Everything it starts it stops, by process group, also on Ctrl-C or SIGTERM (what was
measured so far is still written). All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import dataclasses
import errno
import hashlib
import html
import importlib.util
import json
import multiprocessing
import os
import platform
import pwd
import resource
import secrets
import selectors
import shutil
import signal
import socket
import ssl
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

HOST = "127.0.0.1"
TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
#: seconds a server may take to start and answer its first greeting
START_TIMEOUT = 20.0
#: seconds a server may take to exit after SIGTERM before it is killed
STOP_TIMEOUT = 10.0
#: connections to open at once while building up the idle ones
IDLE_PENDING = 256
#: flood marks a run client-bound when it used this share of its core
CLIENT_BOUND_PERCENT = 90.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- cases, servers, targets -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    key: str
    title: str
    size: int  # body bytes
    sessions: int  # concurrent clients
    messages: int  # in all, before --scale
    keep_open: bool = True
    pipelining: bool = False
    smtp_source: bool = True  # smtp-source can drive it (it has no pipelining)
    tls: bool = False  # STARTTLS with the test certificate (selsmtp and aiosmtpd only)


CASES: tuple[Case, ...] = (
    Case("ka1", "1 KiB, 1 kept-open session", 1024, 1, 2000),
    Case("ka20", "1 KiB, 20 kept-open sessions", 1024, 20, 10000),
    Case("ka200", "1 KiB, 200 kept-open sessions", 1024, 200, 20000),
    Case("conn20", "1 KiB, one connection per message, 20 clients", 1024, 20, 5000, False),
    Case("big20", "100 KiB, 20 kept-open sessions", 102400, 20, 1500),
    Case("pipe20", "1 KiB, 20 pipelined sessions", 1024, 20, 10000, True, True, False),
    Case("tls200", "1 KiB, 200 kept-open STARTTLS sessions", 1024, 200, 20000,
         smtp_source=False, tls=True),
    Case("tlsconn20", "1 KiB, one STARTTLS connection per message, 20 clients", 1024, 20,
         3000, False, smtp_source=False, tls=True),
)  # fmt: skip
#: the certificate the TLS cases give every server that can do TLS
TLS_CERT = TOOLS.parent / "tests" / "certs" / "server.pem"
TLS_KEY = TOOLS.parent / "tests" / "certs" / "server.key"
TLS_CA = TOOLS.parent / "tests" / "certs" / "ca.pem"
#: bound on one STARTTLS exchange while building up idle TLS sessions
TLS_STEP_TIMEOUT = 10.0
#: the servers that can run the TLS cases
TLS_SERVERS = ("selsmtp", "selsmtp-nofsync", "aiosmtpd")
CASE_KEYS = {case.key: case for case in CASES}

#: key -> label; the order of the table's columns
SERVERS: dict[str, str] = {
    "selsmtp": "selsmtp",
    "selsmtp-nofsync": "selsmtp --no-fsync",
    "selsmtp-warning": "selsmtp --log-level warning",
    "aiosmtpd": "aiosmtpd",
    "smtpd": "smtpd (stdlib)",
    "smtp-sink": "smtp-sink -D",
}
#: the servers whose memory and start-up are measured (the --no-fsync twin is the same)
SINGLE_SERVERS = ("selsmtp", "aiosmtpd", "smtpd", "smtp-sink")
#: run only when --servers names them
OPT_IN_SERVERS = ("selsmtp-warning",)
#: for the start-up measure only: the same interpreter running a minimal stdlib server
#: that answers every connection with a 220, the floor under any Python server's start
FLOOR = "python-floor"
FLOOR_LABEL = "bare Python listener (floor)"
FLOOR_SCRIPT = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[2])))
s.listen(64)
while True:
    c = s.accept()[0]
    c.sendall(b"220 " + sys.argv[1].encode() + b" floor\\r\\n")
    c.close()
"""
CLIENTS = ("flood", "smtp-source")
BASELINE = "aiosmtpd"
TIMES = "\u00d7"  # the multiplication sign
DASH = "\u2013"  # an en dash


@dataclasses.dataclass(frozen=True)
class RatioTarget:
    case: str
    peer: str
    at_least: float


RATIO_TARGETS = (
    RatioTarget("ka200", "aiosmtpd", 6.0),
    RatioTarget("ka200", "smtp-sink", 1.3),
    RatioTarget("ka20", "aiosmtpd", 3.0),
    RatioTarget("conn20", "aiosmtpd", 3.5),
    RatioTarget("big20", "aiosmtpd", 5.0),
    RatioTarget("big20", "smtp-sink", 1.2),
    RatioTarget("ka200", "selsmtp-nofsync", 0.9),  # durable within 10% of --no-fsync
    RatioTarget("tls200", "aiosmtpd", 4.0),
    RatioTarget("tlsconn20", "aiosmtpd", 1.5),  # mostly the RSA handshake, in any server
)
CPU_TARGET_CASES = ("ka1", "ka20", "ka200")  # 1 KiB, kept open
CPU_TARGET = 1.0  # seconds per 10,000 messages, at most
RSS_TARGET = 1024.0  # bytes per idle connection, at most
GREETING_TARGET = 40.0  # milliseconds, at most


# -- the machine -----------------------------------------------------------------


class BenchError(Exception):
    """A run that could not be done (a server that did not start, a client that failed)."""


def warn(text: str) -> None:
    print(f"bench: warning: {text}", file=sys.stderr, flush=True)


def note(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss(pid: int) -> int:
    """The process's resident set size in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for process {pid}")


def filesystem_of(path: str) -> str:
    """The type of the file system that holds ``path`` (fsync is free on tmpfs)."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    real = os.path.realpath(path)
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3:
            point = parts[1].replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, parts[2]
    return kind


def raise_nofile(wanted: int) -> int:
    """Raise the soft descriptor limit toward ``wanted``; the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return wanted if soft == resource.RLIM_INFINITY else soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# -- processes -------------------------------------------------------------------


class Processes:
    """Every process this script starts, each in its own process group, so that each
    can be stopped with its children, by its id, and all of them on the way out."""

    def __init__(self) -> None:
        self.live: dict[int, subprocess.Popen[bytes]] = {}

    def start(
        self,
        command: Sequence[str],
        *,
        cpu: int | None,
        cwd: str | Path | None = None,
        stdout: int | IO[bytes] | None = subprocess.DEVNULL,
        stderr: int | IO[bytes] | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        def pin() -> None:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        proc = subprocess.Popen(
            list(command),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=pin,  # no threads in this process: safe
        )
        self.live[proc.pid] = proc
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM the process's group, SIGKILL it if it lingers; the exit status."""
        try:
            if proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._signal(proc, signal.SIGKILL)
                    proc.wait(5)
            # its children (flood's workers) go with it
            self._signal(proc, signal.SIGKILL)
        finally:
            self.live.pop(proc.pid, None)
        return proc.returncode if proc.returncode is not None else -9

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum)

    def stop_all(self) -> None:
        for proc in list(self.live.values()):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=3)


# -- the context of a run --------------------------------------------------------


@dataclasses.dataclass
class Context:
    procs: Processes
    root: Path  # the selsmtp tree that is run (and whose tools/flood.py drives it)
    root_note: str
    python: str
    smtpd_python: str | None
    smtp_sink: str | None
    smtp_source: str | None
    server_cpu: int | None
    client_cpu: int | None
    tmp: Path
    run_as_root: bool
    duration_cap: float
    scale: float

    @property
    def flood(self) -> Path:
        return self.root / "tools" / "flood.py"


@dataclasses.dataclass
class Server:
    key: str
    proc: subprocess.Popen[bytes]
    port: int
    name: str
    mailbox: Path
    log: Path


def server_command(
    ctx: Context, key: str, port: int, folder: Path, name: str, idle: int, tls: bool = False
) -> list[str]:
    if tls:
        if key not in TLS_SERVERS:
            raise BenchError(f"{key} has no TLS here")
        tls_args = ["--tls-cert", str(TLS_CERT), "--tls-key", str(TLS_KEY)]
        return [*server_command(ctx, key, port, folder, name, idle), *tls_args]
    mailbox = str(folder / ("dump" if key == "smtp-sink" else "mailbox"))
    if key in ("selsmtp", "selsmtp-nofsync", "selsmtp-warning"):
        command = [ctx.python, "-m", "selsmtp", "--host", HOST, "--port", str(port)]
        command += ["--mailbox", mailbox, "--name", name]
        if idle:
            command += ["--max-connections", str(idle + 100)]
        if key == "selsmtp-nofsync":
            command.append("--no-fsync")
        if key == "selsmtp-warning":
            command += ["--log-level", "warning"]
        return command
    if key == FLOOR:
        return [ctx.python, "-c", FLOOR_SCRIPT, name, str(port)]
    peer_args = ["--port", str(port), "--mailbox", mailbox, "--name", name]
    if key == "aiosmtpd":
        return [ctx.python, str(TOOLS / "peers.py"), "aiosmtpd", *peer_args]
    if key == "smtpd":
        assert ctx.smtpd_python is not None
        return [ctx.smtpd_python, str(TOOLS / "peers.py"), "smtpd", *peer_args]
    if key == "smtp-sink":
        assert ctx.smtp_sink is not None
        command = [ctx.smtp_sink, "-h", name, "-m", str(max(idle + 100, 1024)), "-D", mailbox]
        if ctx.run_as_root:
            command += ["-u", "nobody"]
        return [*command, f"{HOST}:{port}", "1024"]
    raise BenchError(f"unknown server {key}")


def server_folder(ctx: Context) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=ctx.tmp))
    if ctx.run_as_root:  # smtp-sink drops to nobody, who must be able to write there
        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    return folder


def start_server(
    ctx: Context, key: str, folder: Path, *, idle: int = 0, tls: bool = False
) -> Server:
    """Start a server and wait for its greeting; tries other ports if one is taken."""
    problem = ""
    for _attempt in range(3):
        port = free_port()
        name = f"bench-{secrets.token_hex(4)}"
        log_path = folder / f"{key}.log"
        with open(log_path, "ab") as log:
            proc = ctx.procs.start(
                server_command(ctx, key, port, folder, name, idle, tls),
                cpu=ctx.server_cpu,
                cwd=ctx.root,
                stdout=log,
                stderr=log,
            )
        server = Server(
            key, proc, port, name, folder / ("dump" if key == "smtp-sink" else "mailbox"), log_path
        )
        try:
            wait_greeting(server, time.perf_counter() + START_TIMEOUT, quit_after=True)
            return server
        except BenchError as exc:
            ctx.procs.stop(proc)
            problem = str(exc)
            if "in use" not in log_tail(log_path):
                break
    raise BenchError(f"{key} did not start: {problem}")


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])


def wait_greeting(server: Server, deadline: float, *, quit_after: bool) -> float:
    """Connect in a tight loop until the server's 220 arrives; the time it arrived."""
    while True:
        if server.proc.poll() is not None:
            raise BenchError(f"exited with {server.proc.returncode}: {log_tail(server.log)}")
        if time.perf_counter() > deadline:
            raise BenchError(f"no greeting within {START_TIMEOUT:.0f} s: {log_tail(server.log)}")
        sock = socket.socket()
        try:
            sock.connect((HOST, server.port))
        except OSError:
            sock.close()
            continue
        try:
            sock.settimeout(max(0.1, deadline - time.perf_counter()))
            line = b""
            while not line.endswith(b"\n"):
                data = sock.recv(1024)
                if not data:
                    break
                line += data
            arrived = time.perf_counter()
            if not line.startswith(b"220") or server.name.encode() not in line:
                raise BenchError(f"port {server.port}: unexpected greeting {line[:100]!r}")
            if quit_after:
                with contextlib.suppress(OSError):
                    sock.sendall(b"QUIT\r\n")
                    sock.recv(1024)
            return arrived
        except OSError:
            continue  # a connection reset while the server starts: try again
        finally:
            sock.close()


def stop_server(ctx: Context, server: Server) -> int:
    return ctx.procs.stop(server.proc)


# -- one load run ----------------------------------------------------------------


def run_client(ctx: Context, case: Case, client: str, server: Server, rep: int) -> dict[str, Any]:
    """Drive ``server`` with ``client``; what the client reported."""
    total = max(case.sessions, round(case.messages * ctx.scale))
    if client == "flood":
        return run_flood(ctx, case, server, rep, total)
    return run_smtp_source(ctx, case, server, total)


def run_flood(ctx: Context, case: Case, server: Server, rep: int, total: int) -> dict[str, Any]:
    per_client = max(1, total // case.sessions)
    messages = per_client * case.sessions
    command = [ctx.python, str(ctx.flood), "--host", HOST, "--port", str(server.port)]
    command += f"--clients {case.sessions} --messages {per_client} --size {case.size}".split()
    command += f"--seed {rep} --timeout 30 --duration {ctx.duration_cap} --json".split()
    if case.keep_open:
        command.append("--keep-open")
    if case.pipelining:
        command.append("--pipelining")
    if case.tls:
        command.append("--starttls")
    if server.key != "smtp-sink":  # a cs4410 mailbox: flood checks every record
        command += ["--mailbox", str(server.mailbox)]
    proc = ctx.procs.start(
        command, cpu=ctx.client_cpu, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = communicate(ctx, proc, ctx.duration_cap + 180)
    try:
        report: dict[str, Any] = json.loads(out)
    except ValueError:
        raise BenchError(
            f"flood printed no report (exit {proc.returncode}): "
            f"{err.decode(errors='replace')[-300:]}"
        ) from None
    check = report.get("verification")
    verified = None
    if check is not None:
        verified = {k: check[k] for k in ("found", "checked")}
        verified["problems"] = check["problems"][:5]
    result: dict[str, Any] = {
        "ok": bool(report["ok"]),
        "exit_status": proc.returncode,
        "messages": messages,
        "acknowledged": report["acknowledged"],
        "elapsed_s": report["elapsed_s"],
        "messages_per_s": report["messages_per_s"],
        "mb_per_s": report["mb_per_s"],
        "client_cpu_percent": report["client_cpu_percent"],
        "latency_ms": report["latency_ms"],
        "failures": report["failures"][:5],
        "notes": [],
        "verified": verified,
    }
    if result["ok"] and report["acknowledged"] < messages:
        result["notes"].append(
            f"the --duration cap of {ctx.duration_cap:g} s cut the run short: "
            f"{report['acknowledged']} of {messages} messages"
        )
    return result


def run_smtp_source(ctx: Context, case: Case, server: Server, total: int) -> dict[str, Any]:
    assert ctx.smtp_source is not None
    command = [ctx.smtp_source, "-s", str(case.sessions), "-m", str(total), "-l", str(case.size)]
    command += ["-f", "a@bench.test", "-t", "b@bench.test", "-M", "bench.test"]
    if case.keep_open:
        command.append("-d")  # else one message per connection
    command.append(f"{HOST}:{server.port}")
    started = time.perf_counter()
    proc = ctx.procs.start(
        command, cpu=ctx.client_cpu, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = communicate(ctx, proc, 600)
    elapsed = time.perf_counter() - started
    ok = proc.returncode == 0
    failures = []
    if not ok:
        said = (out + err).decode(errors="replace").strip()[-300:]
        failures.append(f"smtp-source exited {proc.returncode}: {said}")
    return {
        "ok": ok,
        "exit_status": proc.returncode,
        "messages": total,
        "acknowledged": total if ok else 0,
        "elapsed_s": round(elapsed, 4),
        "messages_per_s": round(total / elapsed, 1) if ok else 0.0,
        "mb_per_s": round(total * case.size / elapsed / 1e6, 3) if ok else 0.0,
        "client_cpu_percent": None,
        "latency_ms": None,
        "failures": failures,
        "notes": [],
        "verified": None,
    }


def communicate(ctx: Context, proc: subprocess.Popen[bytes], timeout: float) -> tuple[bytes, bytes]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        ctx.procs.stop(proc, timeout=2)
        raise BenchError(f"client still running after {timeout:.0f} s; stopped") from None
    ctx.procs.live.pop(proc.pid, None)
    return out, err


def count_stored(path: Path, key: str) -> int:
    """Records in a mailbox or smtp-sink dump (for bodies without look-alike lines)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    if key == "smtp-sink":
        return data.count(b"\nX-Mail-Args: ") + data.startswith(b"X-Mail-Args: ")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # the record grammar is selsmtp's own
    from selsmtp.formats import cs4410

    return len(cs4410.NUMBER.findall(data))


def load_run(ctx: Context, case: Case, client: str, key: str, rep: int) -> dict[str, Any]:
    record: dict[str, Any] = {
        "case": case.key,
        "client": client,
        "server": key,
        "rep": rep,
        "loadavg_before": loadavg(),
    }
    folder = server_folder(ctx)
    try:
        server = start_server(ctx, key, folder, tls=case.tls)
        try:
            cpu_before = proc_cpu(server.proc.pid)
            result = run_client(ctx, case, client, server, rep)
            cpu = proc_cpu(server.proc.pid) - cpu_before
            alive = server.proc.poll() is None
        finally:
            status = stop_server(ctx, server)
        record.update(result)
        record["server_cpu_s"] = round(cpu, 3)
        acked = result["acknowledged"]
        record["server_cpu_per_10k_s"] = round(cpu / acked * 10000, 3) if acked else None
        record["server_exit_status"] = status
        if not alive:
            record["ok"] = False
            record["failures"].append(f"the server died: {log_tail(server.log)}")
        verified = result["verified"]
        if verified is not None:
            record["stored"] = verified["found"]
            if verified["problems"]:
                record["ok"] = False
        else:
            record["stored"] = count_stored(server.mailbox, key)
            if record["stored"] < acked:
                record["ok"] = False
                record["failures"].append(f"{acked} acknowledged but {record['stored']} stored")
    except BenchError as exc:
        record.update(ok=False, failures=[str(exc)], messages_per_s=0.0)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    record["loadavg_after"] = loadavg()
    return record


# -- idle connections and start-up -------------------------------------------------


def smtp_reply(sock: socket.socket) -> bytes:
    """Read one whole (possibly multi-line) reply from a blocking socket."""
    buffer = b""
    while True:
        lines = buffer.split(b"\r\n")
        if any(len(line) >= 4 and line[3:4] == b" " for line in lines[:-1]):
            return buffer
        data = sock.recv(4096)
        if not data:
            raise OSError(f"connection closed after {buffer[-80:]!r}")
        buffer += data


def start_tls(sock: socket.socket, context: ssl.SSLContext) -> ssl.SSLSocket:
    """EHLO, STARTTLS, the handshake and EHLO again on a connection that got its
    greeting; what is left is an idle TLS session. Blocking, each step bounded."""
    sock.setblocking(True)
    sock.settimeout(TLS_STEP_TIMEOUT)
    sock.sendall(b"EHLO bench.example\r\n")
    reply = smtp_reply(sock)
    if not reply.startswith(b"250") or b"STARTTLS" not in reply.upper():
        raise OSError(f"no STARTTLS offered: {reply[:80]!r}")
    sock.sendall(b"STARTTLS\r\n")
    reply = smtp_reply(sock)
    if not reply.startswith(b"220"):
        raise OSError(f"STARTTLS refused: {reply[:80]!r}")
    tls = context.wrap_socket(sock, server_hostname=HOST)
    tls.sendall(b"EHLO bench.example\r\n")
    reply = smtp_reply(tls)
    if not reply.startswith(b"250"):
        raise OSError(f"EHLO after STARTTLS refused: {reply[:80]!r}")
    return tls


def hold_connections(
    port: int, count: int, conn: Any, timeout: float, starttls: bool = False
) -> None:
    """In a child process: open ``count`` connections, read each one's greeting (with
    ``starttls``, then take each through STARTTLS one after the other), report, then
    keep them open until told to close them."""
    raise_nofile(count + 64)
    selector = selectors.DefaultSelector()
    held: list[socket.socket] = []
    buffers: dict[socket.socket, bytes] = {}
    failures = 0
    first_failure = ""
    started = 0
    deadline = time.monotonic() + timeout
    try:
        while len(held) + failures < count and time.monotonic() < deadline:
            while started < count and len(buffers) < IDLE_PENDING:
                started += 1
                sock = socket.socket()
                sock.setblocking(False)
                code = sock.connect_ex((HOST, port))
                if code not in (0, errno.EINPROGRESS):
                    failures += 1
                    first_failure = first_failure or os.strerror(code)
                    sock.close()
                    continue
                buffers[sock] = b""
                selector.register(sock, selectors.EVENT_READ)
            for key, _ in selector.select(timeout=0.5):
                sock = key.fileobj  # type: ignore[assignment]
                try:
                    data = sock.recv(1024)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    data, first_failure = b"", first_failure or str(exc)
                line = buffers[sock] + data
                if data and b"\n" not in line:
                    buffers[sock] = line
                    continue
                selector.unregister(sock)
                del buffers[sock]
                if line.startswith(b"220"):
                    held.append(sock)
                else:
                    failures += 1
                    first_failure = first_failure or repr(line[:80])
                    sock.close()
        if starttls:
            context = ssl.create_default_context(cafile=str(TLS_CA))
            plain, held = held, []
            for sock in plain:
                if time.monotonic() >= deadline:
                    failures += 1
                    first_failure = first_failure or "out of time before STARTTLS"
                    sock.close()
                    continue
                try:
                    held.append(start_tls(sock, context))
                except (OSError, ssl.SSLError) as exc:
                    failures += 1
                    first_failure = first_failure or f"STARTTLS: {exc}"
                    sock.close()
        conn.send(
            {"held": len(held), "failures": failures + len(buffers), "first_failure": first_failure}
        )
        conn.recv()  # until the parent has measured
    finally:
        for sock in [*held, *buffers]:
            sock.close()
        selector.close()


def idle_run(
    ctx: Context, key: str, count: int, *, tls: bool = False, starttls: bool = False
) -> dict[str, Any]:
    """RSS growth per idle connection. ``tls``: the server has the test certificate;
    ``starttls``: every connection goes through STARTTLS before it sits idle."""
    record: dict[str, Any] = {"server": key, "connections": count, "tls": starttls}
    folder = server_folder(ctx)
    context = multiprocessing.get_context("fork")
    per_process = max(1, raise_nofile(count + 256) - 128)
    workers: list[tuple[Any, Any]] = []
    started = time.perf_counter()
    try:
        server = start_server(ctx, key, folder, idle=count, tls=tls or starttls)
        try:
            time.sleep(0.3)
            before = proc_rss(server.proc.pid)
            held = failures = 0
            problems: list[str] = []
            for first in range(0, count, per_process):
                share = min(per_process, count - first)
                parent, child = context.Pipe()
                worker = context.Process(
                    target=hold_connections,
                    args=(server.port, share, child, 120.0, starttls),
                    daemon=True,
                )
                worker.start()
                workers.append((worker, parent))
                report = parent.recv()
                held += report["held"]
                failures += report["failures"]
                if report["first_failure"]:
                    problems.append(report["first_failure"])
            time.sleep(0.5)
            after = proc_rss(server.proc.pid)
            alive = server.proc.poll() is None
        finally:
            for worker, parent in workers:
                with contextlib.suppress(OSError):
                    parent.send("close")
                worker.join(10)
                if worker.is_alive():
                    worker.kill()
            stop_server(ctx, server)
        record.update(
            ok=alive and held == count,
            held=held,
            failures=failures,
            problems=problems[:3],
            rss_before_bytes=before,
            rss_after_bytes=after,
            bytes_per_connection=round((after - before) / max(held, 1), 1),
            wall_s=round(time.perf_counter() - started, 2),
        )
        if not alive:
            record["problems"].append(f"the server died: {log_tail(server.log)}")
    except BenchError as exc:
        record.update(ok=False, problems=[str(exc)])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return record


def greeting_run(ctx: Context, key: str) -> dict[str, Any]:
    """Spawn the server and time its first 220 greeting; stop it."""
    folder = server_folder(ctx)
    try:
        port = free_port()
        name = f"bench-{secrets.token_hex(4)}"
        log_path = folder / f"{key}.log"
        command = server_command(ctx, key, port, folder, name, 0)
        with open(log_path, "ab") as log:
            started = time.perf_counter()
            proc = ctx.procs.start(
                command, cpu=ctx.server_cpu, cwd=ctx.root, stdout=log, stderr=log
            )
        server = Server(key, proc, port, name, folder / "mailbox", log_path)
        try:
            arrived = wait_greeting(server, started + START_TIMEOUT, quit_after=False)
        finally:
            stop_server(ctx, server)
        return {"ok": True, "ms": round((arrived - started) * 1000, 2)}
    except BenchError as exc:
        return {"ok": False, "problem": str(exc)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- discovery ---------------------------------------------------------------------


def find_smtpd_python(wanted: str | None) -> tuple[str | None, str]:
    candidates: list[str] = []
    if wanted:
        candidates.append(wanted)
    else:
        if sys.version_info < (3, 12):
            candidates.append(sys.executable)
        for name in ("python3.11", "python3.10"):
            found = shutil.which(name)
            if found:
                candidates.append(found)
        pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
        candidates += [str(p) for p in sorted(pyenv.glob("3.1[01].*/bin/python3"), reverse=True)]
    for python in candidates:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                [python, "-W", "ignore", "-c", "import smtpd, sys; print(sys.version.split()[0])"],
                capture_output=True,
                timeout=30,
            )
            if done.returncode == 0:
                return python, f"Python {done.stdout.decode().strip()} ({python})"
    return None, "no Python 3.11 or older with the smtpd module (--smtpd-python)"


def find_program(name: str) -> str | None:
    for folder in ("", "/usr/sbin", "/usr/local/sbin", "/sbin"):
        path = shutil.which(name) if not folder else os.path.join(folder, name)
        if path and os.access(path, os.X_OK):
            return path
    return None


def blocked_for_others(folder: Path) -> Path | None:
    """The first folder on the way to ``folder`` that other users cannot pass through."""
    for part in [*reversed(folder.resolve().parents), folder.resolve()]:
        if not part.stat().st_mode & stat.S_IXOTH:
            return part
    return None


def available_servers(ctx: Context, smtpd_note: str) -> dict[str, tuple[bool, str]]:
    aiosmtpd = importlib.util.find_spec("aiosmtpd") is not None
    aiosmtpd_note = "not installed: pip install 'selsmtp[bench]'"
    if aiosmtpd:
        from importlib import metadata

        try:
            aiosmtpd_note = f"aiosmtpd {metadata.version('aiosmtpd')}"
        except metadata.PackageNotFoundError:
            aiosmtpd_note = "aiosmtpd"
    sink_note = f"{ctx.smtp_sink} (no fsync)" if ctx.smtp_sink else "not installed"
    blocked = blocked_for_others(ctx.tmp) if ctx.smtp_sink and ctx.run_as_root else None
    if blocked is not None:
        sink_note = f"it runs as nobody, who cannot enter {blocked} (choose another --tmpdir)"
    return {
        "selsmtp": (True, ctx.root_note),
        "selsmtp-nofsync": (True, ctx.root_note + ", --no-fsync (unsafe)"),
        "selsmtp-warning": (True, ctx.root_note + ", --log-level warning"),
        "aiosmtpd": (aiosmtpd, aiosmtpd_note),
        "smtpd": (ctx.smtpd_python is not None, smtpd_note),
        "smtp-sink": (ctx.smtp_sink is not None and blocked is None, sink_note),
    }


def git(*args: str) -> str:
    with contextlib.suppress(OSError):
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        if done.returncode == 0:
            return done.stdout.strip()
    return ""


def snapshot(source: Path, dest: Path) -> str:
    """Copy the selsmtp package and tools/flood.py of ``source`` to ``dest``, so that
    every run of this benchmark runs the same code while others edit the tree; a short
    digest of the copied package."""
    shutil.copytree(
        source / "selsmtp", dest / "selsmtp", ignore=shutil.ignore_patterns("__pycache__")
    )
    (dest / "tools").mkdir()
    shutil.copy2(source / "tools" / "flood.py", dest / "tools" / "flood.py")
    # Why: an installed package has its bytecode; without it (a fresh copy, or
    # PYTHONDONTWRITEBYTECODE in the environment) every start of the server would
    # compile selsmtp from source and the start-up time would measure the compiler.
    compileall.compile_dir(str(dest / "selsmtp"), quiet=1)
    digest = hashlib.sha256()
    for path in sorted((dest / "selsmtp").rglob("*.py")):
        digest.update(path.relative_to(dest).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def choose_root(ctx: Context, requested: Path | None) -> None:
    """Run selsmtp from a snapshot of ``requested`` or of this repository's working
    tree; if that server does not start, from a clean copy of this repository's HEAD."""
    source = requested or REPO
    copy = ctx.tmp / "tree"
    digest = snapshot(source, copy)
    ctx.root = copy
    if requested is None:
        changed = git("status", "--porcelain", "--", "selsmtp", "tools/flood.py")
        dirty = f", {len(changed.splitlines())} changed file(s)" if changed else ", clean"
        ctx.root_note = f"working tree at {git('rev-parse', '--short', 'HEAD')}{dirty}"
    else:
        ctx.root_note = f"tree {source}"
    ctx.root_note += f" (snapshot, package digest {digest})"
    folder = server_folder(ctx)
    try:
        server = start_server(ctx, "selsmtp", folder)
        stop_server(ctx, server)
        return
    except BenchError as exc:
        if requested is not None:
            raise
        problem = str(exc)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    head_copy = ctx.tmp / "head"
    head_copy.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], capture_output=True)
    if archive.returncode != 0:
        raise BenchError(
            f"the working tree's selsmtp does not start ({problem}), and git archive HEAD failed"
        )
    subprocess.run(["tar", "-x", "-C", str(head_copy)], input=archive.stdout, check=True)
    ctx.root = head_copy
    head = git("rev-parse", "--short", "HEAD")
    ctx.root_note = f"clean copy of HEAD {head} (the working tree's server failed: {problem})"
    warn(ctx.root_note)


# -- summaries -------------------------------------------------------------------


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """case -> client -> server -> median, min, max of the rate and the CPU."""
    table: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["case"], run["client"], run["server"]), []).append(run)
    for (case, client, server), group in groups.items():
        good = [r for r in group if r.get("ok")]
        rates = [r["messages_per_s"] for r in good]
        cpus = [r["server_cpu_per_10k_s"] for r in good if r.get("server_cpu_per_10k_s")]
        bound = [r for r in good if (r.get("client_cpu_percent") or 0) >= CLIENT_BOUND_PERCENT]
        table.setdefault(case, {}).setdefault(client, {})[server] = {
            "runs": len(group),
            "ok_runs": len(good),
            "rates": rates,
            "by_rep": {r["rep"]: r["messages_per_s"] for r in good},
            "median": statistics.median(rates) if rates else None,
            "min": min(rates) if rates else None,
            "max": max(rates) if rates else None,
            "cpu_per_10k_median": statistics.median(cpus) if cpus else None,
            "client_bound_runs": len(bound),
            "failures": [f for r in group if not r.get("ok") for f in r.get("failures", [])][:3],
        }
    for clients in table.values():
        for servers in clients.values():
            base = servers.get(BASELINE, {}).get("median")
            for cell in servers.values():
                median = cell["median"]
                cell["ratio_vs_aiosmtpd"] = round(median / base, 3) if median and base else None
    return table


def ratio(
    table: dict[str, Any], case: str, client: str, server: str, peer: str
) -> dict[str, Any] | None:
    cells = table.get(case, {}).get(client, {})
    mine, theirs = cells.get(server), cells.get(peer)
    if not mine or not theirs or not mine["median"] or not theirs["median"]:
        return None
    paired = [
        mine["by_rep"][rep] / theirs["by_rep"][rep]
        for rep in mine["by_rep"]
        if theirs["by_rep"].get(rep)
    ]
    return {
        "value": mine["median"] / theirs["median"],
        "paired_min": min(paired) if paired else None,
        "paired_max": max(paired) if paired else None,
    }


def margin_text(value: float, goal: float, at_least: bool) -> str:
    change = (value / goal - 1) * 100
    if at_least:
        return f"{change:.1f}% above" if change >= 0 else f"{-change:.1f}% short"
    return f"{-change:.1f}% under" if change <= 0 else f"{change:.1f}% over"


def evaluate_targets(
    table: dict[str, Any], idle: dict[str, Any], greeting: dict[str, Any]
) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []

    def add(
        name: str,
        client: str,
        value: float | None,
        goal: float,
        at_least: bool,
        shown: str,
        detail: str = "",
    ) -> None:
        entry: dict[str, Any] = {
            "target": name,
            "client": client,
            "goal": goal,
            "at_least": at_least,
            "measured": value,
            "shown": shown,
            "detail": detail,
        }
        if value is None:
            entry.update(result="n/a", margin="")
        else:
            passed = value >= goal if at_least else value <= goal
            entry.update(
                result="pass" if passed else "miss", margin=margin_text(value, goal, at_least)
            )
        targets.append(entry)

    for target in RATIO_TARGETS:
        peer = SERVERS[target.peer]
        name = f"{CASE_KEYS[target.case].title}: selsmtp ≥ {target.at_least:g}{TIMES} {peer}"
        if target.peer == "selsmtp-nofsync":
            name = f"{CASE_KEYS[target.case].title}: durable within 10% of --no-fsync"
        for client in CLIENTS:
            if target.case == "pipe20" and client == "smtp-source":
                continue
            found = ratio(table, target.case, client, "selsmtp", target.peer)
            if found is None:
                if table.get(target.case, {}).get(client):
                    add(name, client, None, target.at_least, True, "not measured")
                continue
            shown = f"{found['value']:.2f}{TIMES}"
            if found["paired_min"] is not None:
                shown += f" ({found['paired_min']:.2f}{DASH}{found['paired_max']:.2f})"
            add(name, client, found["value"], target.at_least, True, shown)
    for case in CPU_TARGET_CASES:
        for client in CLIENTS:
            cell = table.get(case, {}).get(client, {}).get("selsmtp")
            if cell and cell["cpu_per_10k_median"] is not None:
                value = cell["cpu_per_10k_median"]
                name = f"{CASE_KEYS[case].title}: server CPU per 10,000 messages ≤ 1.0 s"
                add(name, client, value, CPU_TARGET, False, f"{value:.2f} s")
    mine = idle.get("selsmtp")
    if mine and mine.get("bytes_per_connection") is not None:
        value = mine["bytes_per_connection"]
        add(
            f"RSS per idle connection at {mine['connections']:,} ≤ 1 KiB",
            "-",
            value,
            RSS_TARGET,
            False,
            f"{value:,.0f} B",
        )
    start = greeting.get("selsmtp")
    if start and start.get("median_ms") is not None:
        value = start["median_ms"]
        add(
            "start to first greeting ≤ 40 ms", "-", value, GREETING_TARGET, False, f"{value:.1f} ms"
        )
    return targets


# -- output ----------------------------------------------------------------------


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    table = result["summary"]
    servers = [s for s in SERVERS if s in meta["servers_run"]]
    out: list[str] = []
    out.append(f"## selsmtp benchmark, {meta['started']}\n")
    out.append(f"Command: `{meta['command']}`  ")
    out.append(
        f"Machine: {meta['cpus']} CPUs, {meta['platform']}; Python {meta['python']}; "
        f"mailboxes on {meta['tmp_fs']}; load average {meta['loadavg_start']} at the start, "
        f"{meta['loadavg_end']} at the end.  "
    )
    if meta["server_cpu"] is not None:
        out.append(
            f"Servers pinned to CPU {meta['server_cpu']}, clients to CPU {meta['client_cpu']}.  "
        )
    else:
        out.append("**Not pinned** (fewer than two usable CPUs, or --no-pin).  ")
    out.append(f"selsmtp: {meta['selsmtp_source']}.  ")
    out.append(
        f"{meta['repeat']} repetition(s) per case; cells show the median messages/s, "
        f"(min{DASH}max) and, after {TIMES}, the ratio of medians to aiosmtpd in the same "
        "run.\n"
    )
    heads = ["case", "client", *(SERVERS[s] for s in servers)]
    out.append("### Throughput (messages/s)\n")
    out.append("| " + " | ".join(heads) + " |")
    out.append("|" + "---|" * 2 + "--:|" * len(servers))
    bound_mark = False
    for case in CASES:
        for client in CLIENTS:
            cells = table.get(case.key, {}).get(client)
            if not cells:
                continue
            row = [case.title, client]
            for server in servers:
                cell = cells.get(server)
                if not cell:
                    row.append(DASH)
                    continue
                if cell["median"] is None:
                    row.append(f"failed ({cell['runs']} runs)")
                    continue
                low, high = fmt_rate(cell["min"]), fmt_rate(cell["max"])
                text = f"{fmt_rate(cell['median'])} ({low}{DASH}{high})"
                if cell["ratio_vs_aiosmtpd"] is not None and server != BASELINE:
                    text += f" {TIMES}{cell['ratio_vs_aiosmtpd']:.2f}"
                if cell["ok_runs"] < cell["runs"]:
                    text += f" [{cell['runs'] - cell['ok_runs']} failed]"
                if cell["client_bound_runs"]:
                    text += " †"
                    bound_mark = True
                row.append(text)
            out.append("| " + " | ".join(row) + " |")
    if bound_mark:
        out.append(
            f"\n† flood used ≥ {CLIENT_BOUND_PERCENT:.0f}% of its core in some runs: "
            "the client may be what limits the rate."
        )
    out.append("\n### Server CPU seconds per 10,000 messages (median)\n")
    out.append("| " + " | ".join(heads) + " |")
    out.append("|" + "---|" * 2 + "--:|" * len(servers))
    for case in CASES:
        for client in CLIENTS:
            cells = table.get(case.key, {}).get(client)
            if not cells:
                continue
            row = [case.title, client]
            for server in servers:
                value = (cells.get(server) or {}).get("cpu_per_10k_median")
                row.append(DASH if value is None else f"{value:.2f}")
            out.append("| " + " | ".join(row) + " |")
    idle, greeting = result["idle"], result["greeting"]
    if idle or greeting:
        out.append("\n### Memory per idle connection and start-up\n")
        out.append(
            "| server | RSS per idle connection | RSS before → with idle connections "
            f"| start to first 220 (median, min{DASH}max) |"
        )
        out.append("|---|--:|--:|--:|")
        for server in (*SINGLE_SERVERS, FLOOR):
            if server not in idle and server not in greeting:
                continue
            row = [SERVERS.get(server, FLOOR_LABEL)]
            entry = idle.get(server)
            if entry and entry.get("bytes_per_connection") is not None:
                row.append(
                    f"{entry['bytes_per_connection']:,.0f} B at {entry['held']:,}"
                    + ("" if entry["ok"] else " (incomplete)")
                )
                row.append(
                    f"{entry['rss_before_bytes'] / 2**20:.1f} → "
                    f"{entry['rss_after_bytes'] / 2**20:.1f} MiB"
                )
            else:
                problems = "; ".join(entry.get("problems", [])) if entry else ""
                row += [f"failed: {problems}"[:80] if entry else DASH, DASH]
            start = greeting.get(server)
            if start and start.get("median_ms") is not None:
                low, high = start["min_ms"], start["max_ms"]
                row.append(
                    f"{start['median_ms']:.1f} ms ({low:.1f}{DASH}{high:.1f}, "
                    f"n={len(start['samples_ms'])})"
                )
            else:
                row.append(DASH)
            out.append("| " + " | ".join(row) + " |")
    out.extend(idle_tls_table(result.get("idle_tls") or {}))
    if result["targets"]:
        out.append("\n### Targets\n")
        out.append("| target | client | measured | result | margin |")
        out.append("|---|---|--:|---|---|")
        for target in result["targets"]:
            out.append(
                f"| {target['target']} | {target['client']} | {target['shown']} | "
                f"{target['result']} | {target['margin']} |"
            )
        out.append("\nRatios are of medians; in brackets, the range of the per-repetition ratios.")
    skipped = {k: v for k, v in meta["servers"].items() if not v["available"]}
    if skipped:
        out.append(
            "\nNot run: " + "; ".join(f"{SERVERS[k]} ({v['note']})" for k, v in skipped.items())
        )
    failed = [r for r in result["runs"] if not r.get("ok")]
    if failed:
        out.append(
            f"\nFailed runs: {len(failed)} (see the JSON), e.g. "
            f"{failed[0]['case']}/{failed[0]['client']}/{failed[0]['server']}: "
            f"{'; '.join(failed[0].get('failures', []))[:200]}"
        )
    return "\n".join(out) + "\n"


def idle_tls_table(idle_tls: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows: KiB per idle connection, plain beside STARTTLS, per server."""
    if not idle_tls:
        return []
    out = ["\n### Memory per idle connection, plain and after STARTTLS\n"]
    out.append(
        "| server | connections | plain, KiB per connection | after STARTTLS, KiB per "
        "connection | TLS costs |"
    )
    out.append("|---|--:|--:|--:|--:|")
    for server, pair in idle_tls.items():
        cells: list[str] = []
        per: dict[str, float] = {}
        for mode in ("plain", "starttls"):
            entry = pair.get(mode)
            if entry and entry.get("bytes_per_connection") is not None:
                per[mode] = entry["bytes_per_connection"] / 1024
                cells.append(
                    f"{per[mode]:.1f}" + ("" if entry["ok"] else f" ({entry['held']:,} held)")
                )
            else:
                problems = "; ".join(entry.get("problems", [])) if entry else ""
                cells.append(f"failed: {problems}"[:80] if entry else DASH)
        extra = f"+{per['starttls'] - per['plain']:.1f} KiB" if len(per) == 2 else DASH
        count = max((e.get("connections", 0) for e in pair.values()), default=0)
        out.append(f"| {SERVERS[server]} | {count:,} | {cells[0]} | {cells[1]} | {extra} |")
    out.append(
        "\nBoth with the test certificate loaded; growth of the server's VmRSS over the "
        "connections, divided by their count."
    )
    return out


PALETTE = ("#1f77b4", "#aec7e8", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")


def svg_plot(result: dict[str, Any]) -> str:
    """Throughput by case and server: one small bar chart per case and client."""
    table = result["summary"]
    servers = [s for s in SERVERS if s in result["meta"]["servers_run"]]
    panels = [
        (case, client)
        for case in CASES
        for client in CLIENTS
        if table.get(case.key, {}).get(client)
    ]
    columns = 3
    width, height, top = 330, 230, 60
    rows = max(1, (len(panels) + columns - 1) // columns)
    total_w, total_h = columns * width + 20, top + rows * height + 20
    esc = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{total_h}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{total_w}" height="{total_h}" fill="white"/>',
        '<text x="10" y="20" font-size="15" font-weight="bold">'
        f"selsmtp benchmark: messages/s (median; whiskers min{DASH}max), "
        f"{esc(result['meta']['started'])}</text>",
    ]
    for i, server in enumerate(servers):
        lx = 10 + i * 170
        parts.append(
            f'<rect x="{lx}" y="32" width="12" height="12" fill="{PALETTE[i % len(PALETTE)]}"/>'
        )
        parts.append(f'<text x="{lx + 16}" y="42">{esc(SERVERS[server])}</text>')
    for index, (case, client) in enumerate(panels):
        ox = 10 + (index % columns) * width
        oy = top + (index // columns) * height
        cells = table[case.key][client]
        peak = max((c["max"] or 0) for c in cells.values()) or 1.0
        plot_h, plot_w = height - 70, width - 30
        parts.append(f'<text x="{ox}" y="{oy + 12}" font-weight="bold">{esc(case.title)}</text>')
        parts.append(f'<text x="{ox}" y="{oy + 26}">client: {esc(client)}</text>')
        base_y = oy + 36 + plot_h
        parts.append(
            f'<line x1="{ox}" y1="{base_y}" x2="{ox + plot_w}" y2="{base_y}" stroke="#444"/>'
        )
        slot = plot_w / max(1, len(servers))
        for i, server in enumerate(servers):
            cell = cells.get(server)
            if not cell or cell["median"] is None:
                continue
            bar_h = cell["median"] / peak * (plot_h - 14)
            x = ox + i * slot + slot * 0.15
            bar_w = slot * 0.7
            parts.append(
                f'<rect x="{x:.1f}" y="{base_y - bar_h:.1f}" width="{bar_w:.1f}" '
                f'height="{bar_h:.1f}" fill="{PALETTE[i % len(PALETTE)]}"/>'
            )
            low = base_y - cell["min"] / peak * (plot_h - 14)
            high = base_y - cell["max"] / peak * (plot_h - 14)
            mid = x + bar_w / 2
            parts.append(
                f'<line x1="{mid:.1f}" y1="{low:.1f}" x2="{mid:.1f}" y2="{high:.1f}" '
                'stroke="#222"/>'
            )
            parts.append(
                f'<text x="{mid:.1f}" y="{high - 3:.1f}" text-anchor="middle" '
                f'font-size="10">{fmt_rate(cell["median"])}</text>'
            )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# -- main ------------------------------------------------------------------------


def parse_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {what}: {', '.join(unknown)} (choose from {', '.join(allowed)})"
        )
    return items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark selsmtp side by side with aiosmtpd, the stdlib smtpd and "
        "Postfix's smtp-sink, on this machine.",
        epilog="Cases: " + "; ".join(f"{c.key}: {c.title}" for c in CASES),
    )
    add = parser.add_argument
    add(
        "--quick",
        action="store_true",
        help="a small run: 1 repetition, a tenth of the messages, 1,000 idle connections "
        "(200 for TLS), 3 start-ups",
    )
    add("--repeat", type=int, default=None, metavar="N", help="repetitions per case (5)")
    add(
        "--cases",
        type=lambda t: parse_list(t, list(CASE_KEYS), "case"),
        default=None,
        metavar="LIST",
        help="comma-separated cases (all)",
    )
    add(
        "--servers",
        type=lambda t: parse_list(t, list(SERVERS), "server"),
        default=None,
        metavar="LIST",
        help="comma-separated servers (all that are installed, except "
        + ", ".join(OPT_IN_SERVERS)
        + "): "
        + ", ".join(SERVERS),
    )
    add(
        "--clients",
        type=lambda t: parse_list(t, CLIENTS, "client"),
        default=None,
        metavar="LIST",
        help="flood, smtp-source (both where installed)",
    )
    add(
        "--scale",
        type=float,
        default=None,
        metavar="F",
        help="multiply every case's message count by F (1, or 0.1 with --quick)",
    )
    add(
        "--idle-connections",
        type=int,
        default=None,
        metavar="N",
        help="idle connections for the memory measure; 0 skips it (10000)",
    )
    add(
        "--idle-tls-connections",
        type=int,
        default=None,
        metavar="N",
        help="idle connections for the plain-beside-STARTTLS memory measure of the servers "
        "that do TLS; 0 skips it (500; 200 with --quick)",
    )
    add(
        "--greeting-samples",
        type=int,
        default=None,
        metavar="N",
        help="start-ups timed per server; 0 skips it (10)",
    )
    add(
        "--duration-cap",
        type=float,
        default=None,
        metavar="S",
        help="flood starts no new message after S seconds (30; 5 with --quick)",
    )
    add("--json", default="bench-results.json", metavar="FILE", help="(%(default)s)")
    add("--markdown", default=None, metavar="FILE", help="also write the tables here")
    add("--plot", default=None, metavar="FILE.svg", help="draw throughput as a plain SVG")
    add("--tmpdir", default=None, metavar="DIR", help="where mailboxes go (the system's temp)")
    add(
        "--selsmtp-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the selsmtp tree to run (this repository; a copy of HEAD if its server "
        "fails to start)",
    )
    add("--smtpd-python", default=None, metavar="PATH", help="a Python ≤ 3.11 for smtpd")
    add("--no-pin", action="store_true", help="do not pin servers and clients to cores")
    return parser


def choose_cpus(no_pin: bool) -> tuple[int | None, int | None]:
    if no_pin:
        warn("--no-pin: servers and clients share the CPUs")
        return None, None
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = []
    if len(cpus) < 2:
        warn("fewer than two usable CPUs: servers and clients are not pinned")
        return None, None
    return cpus[0], cpus[1]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 5)
    scale = args.scale or (0.1 if args.quick else 1.0)
    idle_count = (
        args.idle_connections
        if args.idle_connections is not None
        else (1000 if args.quick else 10000)
    )
    idle_tls_count = (
        args.idle_tls_connections
        if args.idle_tls_connections is not None
        else (200 if args.quick else 500)
    )
    greetings = (
        args.greeting_samples if args.greeting_samples is not None else (3 if args.quick else 10)
    )
    cap = args.duration_cap or (5.0 if args.quick else 30.0)
    cases = [CASE_KEYS[k] for k in args.cases] if args.cases else list(CASES)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    server_cpu, client_cpu = choose_cpus(args.no_pin)
    if client_cpu is not None:  # this script is a client too (idle connections, greetings)
        os.sched_setaffinity(0, {client_cpu})
    raise_nofile(1 << 20)  # the servers inherit it: 10,000 idle connections need room
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="selsmtp-bench-", dir=args.tmpdir))
    tmp.chmod(0o755)
    smtpd_python, smtpd_note = find_smtpd_python(args.smtpd_python)
    ctx = Context(
        procs=procs,
        root=REPO,
        root_note="",
        python=sys.executable,
        smtpd_python=smtpd_python,
        smtp_sink=find_program("smtp-sink"),
        smtp_source=find_program("smtp-source"),
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        tmp=tmp,
        run_as_root=os.geteuid() == 0,
        duration_cap=cap,
        scale=scale,
    )
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    runs: list[dict[str, Any]] = []
    idle: dict[str, Any] = {}
    idle_tls: dict[str, dict[str, Any]] = {}
    greeting: dict[str, Any] = {}
    interrupted = False
    meta: dict[str, Any] = {}
    try:
        choose_root(ctx, args.selsmtp_dir)
        found = available_servers(ctx, smtpd_note)
        wanted = args.servers or [s for s in SERVERS if s not in OPT_IN_SERVERS]
        servers = [s for s in wanted if found[s][0]]
        for server in wanted:
            if not found[server][0]:
                warn(f"skipping {server}: {found[server][1]}")
        if not servers:
            raise BenchError("none of the servers asked for can run here")
        clients = args.clients or list(CLIENTS)
        if "smtp-source" in clients and ctx.smtp_source is None:
            if args.clients:
                warn("skipping smtp-source: not installed (apt-get install postfix)")
            clients.remove("smtp-source")
        fs = filesystem_of(str(tmp))
        if fs in ("tmpfs", "ramfs"):
            warn(f"the mailboxes are on {fs}, where fsync costs nothing (--tmpdir)")
        meta = {
            "started": started,
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "server_cpu": server_cpu,
            "client_cpu": client_cpu,
            "tmp": str(tmp),
            "tmp_fs": fs,
            "loadavg_start": loadavg(),
            "selsmtp_source": ctx.root_note,
            "repeat": repeat,
            "scale": scale,
            "idle_connections": idle_count,
            "idle_tls_connections": idle_tls_count,
            "duration_cap_s": cap,
            "quick": args.quick,
            "servers": {
                k: {"label": SERVERS[k], "available": v[0], "note": v[1]}
                for k, v in found.items()
                if k in wanted
            },
            "servers_run": servers,
            "clients": clients,
            "cases": {c.key: dataclasses.asdict(c) for c in cases},
        }
        plan = [
            (rep, case, client)
            for rep in range(repeat)
            for case in cases
            for client in clients
            if client == "flood" or case.smtp_source
        ]
        # A TLS case runs only the servers that do TLS here (its other cells show a dash).
        for_case = {c.key: [k for k in servers if not c.tls or k in TLS_SERVERS] for c in cases}
        total = sum(len(for_case[case.key]) for _, case, _ in plan)
        done = 0
        for rep, case, client in plan:
            turn = for_case[case.key]
            shift = rep % len(turn) if turn else 0
            for key in turn[shift:] + turn[:shift]:
                done += 1
                run = load_run(ctx, case, client, key, rep)
                runs.append(run)
                status = (
                    "ok" if run.get("ok") else "FAILED: " + "; ".join(run.get("failures", []))[:200]
                )
                cpu = run.get("server_cpu_per_10k_s")
                note(
                    f"[{done}/{total}] rep {rep + 1} {case.key} {client} {key}: "
                    f"{run.get('messages_per_s', 0):,.0f} msg/s"
                    + (f", {cpu:.2f} CPU s/10k" if cpu else "")
                    + f" {status}"
                )
        if idle_count > 0:
            for key in [s for s in SINGLE_SERVERS if s in servers]:
                entry = idle_run(ctx, key, idle_count)
                idle[key] = entry
                status = "" if entry.get("ok") else f" FAILED {entry.get('problems')}"
                note(
                    f"idle {key}: {entry.get('bytes_per_connection', '?')} B per connection "
                    f"({entry.get('held', 0)} held){status}"
                )
        if idle_tls_count > 0:
            for key in [s for s in SINGLE_SERVERS if s in servers and s in TLS_SERVERS]:
                for mode in ("plain", "starttls"):
                    entry = idle_run(ctx, key, idle_tls_count, tls=True, starttls=mode != "plain")
                    idle_tls.setdefault(key, {})[mode] = entry
                    status = "" if entry.get("ok") else f" FAILED {entry.get('problems')}"
                    note(
                        f"idle {key} with TLS on, {mode}: "
                        f"{entry.get('bytes_per_connection', '?')} B per connection "
                        f"({entry.get('held', 0)} held){status}"
                    )
        if greetings > 0:
            samples: dict[str, list[float]] = {}
            problems: dict[str, list[str]] = {}
            singles = [s for s in SINGLE_SERVERS if s in servers]
            if "selsmtp" in singles:
                singles.append(FLOOR)
            for _ in range(greetings):
                for key in singles:
                    sample = greeting_run(ctx, key)
                    if sample["ok"]:
                        samples.setdefault(key, []).append(sample["ms"])
                    else:
                        problems.setdefault(key, []).append(sample["problem"])
            for key in singles:
                values = samples.get(key, [])
                greeting[key] = {
                    "samples_ms": values,
                    "median_ms": statistics.median(values) if values else None,
                    "min_ms": min(values) if values else None,
                    "max_ms": max(values) if values else None,
                    "problems": problems.get(key, [])[:3],
                }
                if values:
                    note(f"greeting {key}: median {statistics.median(values):.1f} ms")
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        interrupted = True
        warn("interrupted: stopping everything and writing what was measured")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    if not meta:
        return 1
    meta["loadavg_end"] = loadavg()
    meta["interrupted"] = interrupted
    table = summarize(runs)
    result: dict[str, Any] = {
        "meta": meta,
        "summary": table,
        "idle": idle,
        "idle_tls": idle_tls,
        "greeting": greeting,
        "runs": runs,
    }
    result["targets"] = evaluate_targets(table, idle, greeting)
    text = markdown(result)
    print(text)
    with open(args.json, "w", encoding="utf-8") as file:
        json.dump(result, file, indent=1)
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    if args.plot:
        Path(args.plot).write_text(svg_plot(result), encoding="utf-8")
    note(f"results in {args.json}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
