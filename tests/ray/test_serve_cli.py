"""`forge-ray serve` as a user runs it: answers over HTTP, stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.gr_run import make_gr_run

pytestmark = pytest.mark.ray
PORT = 18432


def test_serve_command_answers_and_stops_on_sigterm(ray_cluster, tmp_path):
    run = make_gr_run(tmp_path)
    cmd = [sys.executable, "-m", "forge_ray", "serve", "--model", str(run.model), "--port", str(PORT),
           "--address", ray_cluster.address, "cpus_per_replica=0.5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        body = json.dumps({"history": [run.key(run.item_ids[0])], "k": 3}).encode()
        deadline, answer = time.monotonic() + 180, None
        while answer is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{PORT}/recommend", data=body, method="POST")
                with urllib.request.urlopen(req, timeout=30) as r:
                    answer = json.loads(r.read())
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        assert answer is not None, f"no answer; exit {proc.poll()}"
        assert len(answer["items"]) == 3
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert f"at http://127.0.0.1:{PORT}/recommend" in out and out.rstrip().endswith("stopped")
    with pytest.raises(urllib.error.URLError):  # nothing listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{PORT}/recommend", data=body, timeout=5)
