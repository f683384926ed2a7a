"""`ray job submit` entry points, submitted to a real `ray start --head` on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job_server(tmp_path_factory):
    """A head node started with the `ray` CLI; stopped through its own process group."""
    bin_dir = Path(sys.executable).parent
    port, dash = _free_port(), _free_port()
    # Every listening port explicit: the defaults (e.g. the agent's 52365) clash with
    # the session's other Ray cluster on this machine.
    extra_ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "ray-client-server-port", "runtime-env-agent-port", "node-manager-port",
        "object-manager-port")]
    temp = Path("/tmp") / f"frj-{uuid.uuid4().hex[:6]}"  # short: Ray's socket paths have a length limit
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: on SIGTERM the head otherwise drains its
    # node for up to 30 s (for Serve proxies on Kubernetes) before stopping
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path_factory.mktemp("ray_head") / "head.log", "w")
    proc = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats",
         *extra_ports],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    from ray.job_submission import JobSubmissionClient

    address = f"http://127.0.0.1:{dash}"
    client, deadline = None, time.time() + 120
    while client is None:
        try:
            client = JobSubmissionClient(address)
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                pytest.fail(f"ray start --head did not come up; see {log.name}")
            time.sleep(1)
    yield client, dash
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def _submit(client, entrypoint: str) -> str:
    """Submit, retrying while the head's job agent is still starting."""
    deadline = time.time() + 300
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=_runtime_env())
        except (RuntimeError, requests.ConnectionError) as e:
            # The job agent starts after the dashboard; on a loaded machine it can
            # also drop a connection while starting.
            transient = isinstance(e, requests.ConnectionError) or "No available agent" in str(e)
            if not transient or time.time() > deadline:
                raise
            time.sleep(2)


def _wait(client, job_id: str, timeout: float = 300):
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(1)
    client.stop_job(job_id)
    raise AssertionError(f"job {job_id} still running after {timeout}s")


def _runtime_env() -> dict:
    import yaml

    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    env["working_dir"] = str(REPO)
    return env


def test_job_server_listens_on_loopback_only(job_server):
    _, dash = job_server
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    listeners = [line.split()[3] for line in out.splitlines() if line.split()[3].endswith(f":{dash}")]
    assert listeners and all(addr.startswith("127.0.0.1:") for addr in listeners), listeners


def test_synth_job_runs_and_writes_output(job_server, tmp_path):
    from ray.job_submission import JobStatus

    client, _ = job_server
    out = tmp_path / "synth"
    job_id = _submit(client, f"python -m jobs.synth --out {out} --items 1000 --dim 8 --users 20 --seed 3 --no-progress")
    assert _wait(client, job_id) == JobStatus.SUCCEEDED, client.get_job_logs(job_id)
    assert "wrote" in client.get_job_logs(job_id)
    assert (out / "manifest.json").is_file()


def test_failing_job_reports_the_one_line_error(job_server, tmp_path):
    from ray.job_submission import JobStatus

    client, _ = job_server
    job_id = _submit(client, f"python -m jobs.synth --out {tmp_path / 'x'} --items 10 --dim 8 --users 2")
    assert _wait(client, job_id) == JobStatus.FAILED
    logs = client.get_job_logs(job_id)
    assert "forge-ray synth: error: command line: SynthConfig: items must be >=" in logs
    assert "Traceback" not in logs and not (tmp_path / "x").exists()
