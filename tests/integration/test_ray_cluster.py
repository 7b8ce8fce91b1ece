"""The Ray executor on a cluster it connects to by address (``ray start --head``), not one it starts.

The driver runs in a subprocess: Ray caches its authentication mode and token per process, and a
driver of another cluster must not leak them into the other tests' local Ray.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

UNIT = Path(__file__).resolve().parents[1] / "unit"

DRIVER = """
import json, os, sys
from pathlib import Path
from ray import cloudpickle
import test_executor
from test_executor import SHARDS, SquareWorker, make_ctx
from speed.executors import WorkerFactory

cloudpickle.register_pickle_by_value(test_executor)
ctx, session = make_ctx(Path(sys.argv[1]), kind="ray", address=sys.argv[2], num_workers=2, cpus_per_worker=1)
try:
    out = dict(ctx.executor.map(ctx, WorkerFactory(SquareWorker, {"offset": 1}), SHARDS))
    calls = ctx.ledger.totals(stage="toy").calls
finally:
    session.close()
import ray
print(json.dumps({
    "values": {k: v["values"] for k, v in out.items()},
    "pids": sorted({v["pid"] for v in out.values()}),
    "driver": os.getpid(),
    "calls": calls,
    "still_connected": ray.is_initialized(),
}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster():
    pytest.importorskip("ray")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # token authentication (Ray >= 2.5x) with this cluster's own token, shared with the driver
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # --block: the cluster lives as long as this process; its own temp dir keeps it out of
    # /tmp/ray's "current cluster" file that other processes' ray.init() might pick up
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}")
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the Ray head never listened")
    time.sleep(3)  # the raylet registers after the GCS listens
    yield f"127.0.0.1:{port}", env
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(temp, ignore_errors=True)


def test_ray_executor_runs_on_a_cluster_by_address(tmp_path, cluster):
    address, env = cluster
    env = {**env, "PYTHONPATH": os.pathsep.join([str(UNIT), env.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp_path), address],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["values"] == {f"s{i}": [n * n + 1 for n in range(3 * i, 3 * i + 3)] for i in range(5)}
    # the shards ran in the cluster's actors, and every call reached the run's ledger
    assert out["driver"] not in out["pids"] and 1 <= len(out["pids"]) <= 2
    assert out["calls"] == 15
    assert not out["still_connected"]  # the executor disconnected; the cluster is the fixture's
