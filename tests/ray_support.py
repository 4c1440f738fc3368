"""A real two-node Ray cluster for tests, inside a private network and PID namespace.

``run_cluster(steps, workdir)`` (pytest side) writes a spec and runs this file as a script under
``unshare --net --pid --fork --mount-proc``.  Inside the namespace only loopback exists, so every
Ray process binds to and talks over 127.0.0.1, and the namespace's PID 1 is this script: when it
ends (or is killed on a timeout) the kernel kills every process it started, and nothing outside is
touched.  The script brings ``lo`` up, starts a head node and a second node (``ray start``, 1 CPU
each, dashboard and usage stats off, node-death detection in about 2 s), runs the steps one after
the other, records their outcome and SIGKILLs what is left (only its own processes exist there):

* ``argv``/``env``/``timeout``: a command (``RAY_ADDRESS`` points at the head);
* ``kill``: ``{"target": "node2" | "driver", "manifest": path, "after_done": n, "delay": s}`` -
  once the batch manifest records ``n`` completions (``done`` events), wait ``delay`` seconds and
  SIGKILL the second node's raylet or the command itself.

Tests skip (``require_ray_cluster``) when Ray, its ``ray`` command, ``unshare`` or ``ip`` is missing
or namespaces cannot be created.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HEAD_PORT = 6379
NODE2_MANAGER_PORT = 6390
#: Ray settings for the test cluster: quick detection of a dead node, no telemetry.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def _ray_cli() -> str | None:
    found = Path(sys.executable).with_name("ray")
    return str(found) if found.is_file() else shutil.which("ray")


def cluster_unavailable() -> str | None:
    """Why a test cluster cannot be started here (``None`` when it can)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (pip install 'medseg[ray]')"
    if _ray_cli() is None:
        return "the `ray` command is not installed"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not available"
    probe = subprocess.run(
        ["unshare", "--net", "--pid", "--fork", "--mount-proc", "ip", "link", "set", "lo", "up"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return f"cannot create a private network/PID namespace: {probe.stderr.strip()[:200]}"
    return None


def require_ray_cluster() -> None:
    """Skip the calling test when a namespaced Ray cluster cannot be started."""
    import pytest

    reason = cluster_unavailable()
    if reason is not None:
        pytest.skip(reason)


def run_cluster(
    steps: list[dict[str, Any]], workdir: Path, *, timeout: float = 900, nodes: int = 2, cpus: int = 1
) -> list[dict[str, Any]]:
    """Start the namespaced cluster (``nodes`` nodes of ``cpus`` CPUs), run ``steps``, stop it; each step's outcome.

    Each outcome has ``returncode``, ``stdout``, ``stderr``, ``killed`` (the kill happened) and
    ``seconds``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    # Unix socket paths are limited to ~107 bytes: Ray's session folder goes under a short name.
    temp_dir = tempfile.mkdtemp(prefix="mray-", dir="/tmp")
    spec = {"steps": steps, "temp_dir": temp_dir, "result": str(workdir / "cluster-result.json"), "nodes": nodes,
            "cpus": cpus}  # fmt: skip
    spec_path = workdir / "cluster-spec.json"
    spec_path.write_text(json.dumps(spec))
    command = ["unshare", "--net", "--pid", "--fork", "--mount-proc", sys.executable, __file__, str(spec_path)]
    log = workdir / "cluster.log"
    try:
        with log.open("w") as fh:
            proc = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    result = workdir / "cluster-result.json"
    if proc.returncode != 0 or not result.is_file():
        raise AssertionError(f"test cluster failed (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
    outcomes: list[dict[str, Any]] = json.loads(result.read_text())
    return outcomes


# ---------------------------------------------------------------------------- inside the namespace
def done_events(manifest: Path) -> int:
    """Completions recorded so far in a batch manifest (0 while it does not exist)."""
    if not manifest.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{manifest}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM events WHERE event = 'done'").fetchone()[0])
    except sqlite3.Error:
        return 0


def _raylet_pid(manager_port: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"raylet") and f"--node_manager_port={manager_port}".encode() in args:
            return int(entry.name)
    return None


def _ray(ray: str, *args: str, env: dict[str, str]) -> None:
    subprocess.run([ray, *args], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)


def _start_cluster(temp_dir: str, env: dict[str, str], *, nodes: int, cpus: int) -> None:
    ray = _ray_cli()
    assert ray is not None
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    common = ["--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0", "--object-store-memory=1000000000"]
    _ray(ray, "start", "--head", f"--port={HEAD_PORT}", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp_dir}", *common, env=env)  # fmt: skip
    for index in range(1, nodes):
        _ray(ray, "start", f"--address=127.0.0.1:{HEAD_PORT}", f"--node-manager-port={NODE2_MANAGER_PORT + index - 1}",
             *common, env=env)  # fmt: skip
    # Wait until the scheduler sees every node's CPUs as available (right after `ray start` a node can be
    # registered before its resources are, and work would all land on the head).
    wait = (
        "import ray, time\n"
        "ray.init(logging_level='ERROR', log_to_driver=False)\n"
        "deadline = time.monotonic() + 60\n"
        f"while ray.available_resources().get('CPU', 0) < {nodes * cpus} and time.monotonic() < deadline:\n"
        "    time.sleep(0.1)\n"
    )
    subprocess.run([sys.executable, "-c", wait], check=True, env=env, capture_output=True, timeout=120)


def _run_step(step: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        return _run_step_to(step, env, out, err)


def _run_step_to(step: dict[str, Any], env: dict[str, str], out: Any, err: Any) -> dict[str, Any]:
    t0 = time.monotonic()
    proc = subprocess.Popen(step["argv"], env={**env, **step.get("env", {})}, stdout=out, stderr=err, text=True)
    killed = False
    kill = step.get("kill")
    deadline = t0 + float(step.get("timeout", 600))
    if kill:
        manifest = Path(kill["manifest"])
        while proc.poll() is None and done_events(manifest) < int(kill["after_done"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(float(kill.get("delay", 0.0)))
        if proc.poll() is None:
            if kill["target"] == "driver":
                proc.send_signal(signal.SIGKILL)
                killed = True
            else:
                pid = _raylet_pid(NODE2_MANAGER_PORT)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed = True
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out.seek(0)
    err.seek(0)
    return {
        "returncode": proc.returncode,
        "stdout": out.read(),
        "stderr": err.read()[-20000:],
        "killed": killed,
        "seconds": round(time.monotonic() - t0, 2),
    }


def _kill_namespace() -> None:
    """SIGKILL every other process of the namespace (all started here; faster than ``ray stop``)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


def main(spec_path: str) -> int:
    """Entry point inside the namespace (PID 1): cluster up, steps, cluster down, outcomes written."""
    spec = json.loads(Path(spec_path).read_text())
    env = {**os.environ, **RAY_ENV, "RAY_ADDRESS": f"127.0.0.1:{HEAD_PORT}"}
    outcomes = []
    t0 = time.monotonic()
    try:
        _start_cluster(spec["temp_dir"], env, nodes=int(spec.get("nodes", 2)), cpus=int(spec.get("cpus", 1)))
        print(f"cluster started in {time.monotonic() - t0:.1f} s", flush=True)
        for step in spec["steps"]:
            outcomes.append(_run_step(step, env))
            print(f"step done in {outcomes[-1]['seconds']} s (exit {outcomes[-1]['returncode']})", flush=True)
    finally:
        _kill_namespace()
    Path(spec["result"]).write_text(json.dumps(outcomes))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
