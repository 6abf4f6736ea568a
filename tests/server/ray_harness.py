"""`sd35trt serve --ray` in a subprocess on 127.0.0.1, and what the Ray tests read of it: its process
tree (from /proc), the TCP ports that tree listens on (`ss -ltnp`), its CPU time."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

LOOPBACK = ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]")
REPLICA_TITLE = "ray::ServeReplica:sd35trt:Model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> tuple[dict[int, list[int]], dict[int, int]]:
    """({parent pid: child pids}, {pid: CPU clock ticks used so far, user + system})."""
    tree: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(stat[1]), []).append(int(entry))
        ticks[int(entry)] = int(stat[11]) + int(stat[12])
    return tree, ticks


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running (a zombie, already dead and waiting to be reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class RayServer:
    """The command in a subprocess; `stop()` sends SIGTERM and waits. Every process of its tree seen
    while it ran is remembered in `seen`, so what survives it can be named."""

    def __init__(self, model: Path, replicas: int, log: Path, *extra: str) -> None:
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        self.seen: set[int] = set()
        self._ticks: dict[int, int] = {}  # the latest CPU ticks read of every process of the tree
        cmd = [sys.executable, "-m", "sd35trt", "serve", "--ray", "--model", str(model), "--backend", "onnxruntime",
               "--replicas", str(replicas), "--gpus-per-replica", "0", "--intra-op-threads", "1",
               "--port", str(self.port), "--max-size", "256", "--max-steps", "500", "--max-prompt-chars", "300",
               "--timeout-s", "60", *extra]
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 150) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve --ray exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            self.tree()
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"not ready within {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def tree(self) -> list[int]:
        """The live processes under the command (remembered in `seen`, with their CPU time so far)."""
        kids, ticks = _processes()
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(kids.get(pid, []))
            self._ticks[pid] = max(self._ticks.get(pid, 0), ticks.get(pid, 0))
        self.seen.update(out)
        return out

    def cpu_s(self) -> float:
        """CPU seconds of every process of the tree, as last read (a process's last moments are missed)."""
        return sum(self._ticks.values()) / os.sysconf("SC_CLK_TCK")

    def replicas(self) -> list[int]:
        return sorted(p for p in self.tree() if cmdline(p).startswith(REPLICA_TITLE))

    def listeners(self) -> list[tuple[str, int]]:
        """(local address, pid) of every listening TCP socket of the tree."""
        pids = set(self.tree())
        out = []
        for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines():
            fields = line.split()
            for pid in map(int, re.findall(r"pid=(\d+)", line)):
                if pid in pids:
                    out.append((fields[3], pid))
        return out

    def stop(self, timeout_s: float = 90) -> tuple[int, float]:
        """(exit status, seconds to stop); the tree is read every 0.2 s meanwhile (for `cpu_s`)."""
        self.tree()
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        while self.proc.poll() is None:
            if time.monotonic() - t0 > timeout_s:
                self.kill()
                raise AssertionError(f"serve --ray did not stop within {timeout_s} s")
            self.tree()
            time.sleep(0.2)
        return self.proc.returncode, time.monotonic() - t0

    def survivors(self) -> list[str]:
        return [f"{p} {cmdline(p)[:80]}" for p in sorted(self.seen) if alive(p)]

    def kill(self) -> None:
        """After a failure: SIGKILL what is left of the tree, by pid."""
        for pid in sorted(self.seen | set(self.tree())):
            if alive(pid) and ("ray" in cmdline(pid) or "sd35trt" in cmdline(pid)):  # not a reused pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait(10)
