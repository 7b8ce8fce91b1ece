"""Synthesis on a local Ray cluster (2 workers, 1 CPU each) gives the same examples as in-process."""

from __future__ import annotations

import json
import os

import pytest

from synth_helpers import prepare_upstream, write_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return prepare_upstream(tmp_path_factory.mktemp("synth-ray"))


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_ray_and_local_executors_write_the_same_examples(tmp_path, upstream, local_ray):
    from speed.config import load_config
    from speed.io import read_jsonl, read_rows
    from speed.runner import Runner

    Runner(load_config(write_config(tmp_path, "local", upstream, n=24, shard_size=4))).run()
    ray_cfg = load_config(
        write_config(
            tmp_path,
            "ray",
            upstream,
            n=24,
            shard_size=4,
            executor="{kind: ray, num_workers: 2, cpus_per_worker: 1}",
        )
    )
    Runner(ray_cfg).run()

    local, remote = tmp_path / "local" / "synthesize", tmp_path / "ray" / "synthesize"
    # the same raw outputs, shard by shard (the models ran in the actors with the same seeds) ...
    for shard in sorted(p.name for p in (local / "shards").glob("*.jsonl")):
        assert read_jsonl(remote / "shards" / shard) == read_jsonl(local / "shards" / shard)
    # ... and the same examples after filters, decontamination and dedup
    rows = read_rows(local)
    assert rows and read_rows(remote) == rows

    manifest = json.loads((remote / "manifest.json").read_text())
    # the work ran in the actors: 6 shards, all processed there, every call ledgered in the run
    assert manifest["stats"]["shards"]["run"] == 6
    assert manifest["calls"]["senior"]["calls"] == 24
    assert (
        manifest["calls"]["revisor"]["calls"]
        == json.loads((local / "manifest.json").read_text())["calls"]["revisor"]["calls"]
    )
    pids = {json.loads(p.read_text()).get("pid") for p in (remote / "shards").glob("*.done")}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
