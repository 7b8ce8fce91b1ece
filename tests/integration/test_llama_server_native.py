"""llama.cpp's own server (``llama-server``, built for this CPU) serving the packaged SmolLM2-135M.

What is checked, on a real server on 127.0.0.1 with two slots: four schema-constrained requests sent
at once all validate against the schema; the server decoded more than one of them together (its
``/metrics`` counts busy slots per decode step, cumulatively: an average above 1 is only possible if
some step ran two requests, whatever the machine's speed); a seeded request asked twice, alone, gets
the same text; three samples on two slots come back as three; the process is gone after ``close()``, and the
watchdog ends the binary when its owner is killed outright (SIGKILL).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from needs import skip_or_fail
from procs import alive as _alive
from speed import hardware
from speed.config import LlamaCppServerSpec
from speed.llm import Request, Sampling, load_backend
from speed.llm.server import LlamaCppServerBackend

pytestmark = pytest.mark.slow

jsonschema = pytest.importorskip("jsonschema")

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 20, "maxLength": 80},
        # long enough that each request takes many decode steps, so the four overlap on two slots
        "summary": {"type": "string", "minLength": 120, "maxLength": 400},
        "rating": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
    },
    "required": ["title", "summary", "rating"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def native_spec(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> LlamaCppServerSpec:
    if hardware.find_server() is None:
        skip_or_fail(
            "llama-server is not built for this CPU: PYTHONPATH=src python -m speed.hardware build-server"
        )
    log = tmp_path_factory.mktemp("native") / "server.log"
    return LlamaCppServerSpec(
        backend="llamacpp_server",
        model=str(smollm2_gguf),
        threads=1,
        n_ctx=1024,
        max_retries=1,
        timeout_s=300.0,
        options={"engine": "native", "parallel": 2, "log_path": str(log)},
    )


def _metric(base_url: str, name: str) -> float:
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    match = re.search(rf"^llamacpp:{name} ([0-9.eE+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics:\n{text[:500]}"
    return float(match.group(1))


def test_four_schema_requests_on_two_slots_validate_and_overlap(native_spec: LlamaCppServerSpec) -> None:
    backend = load_backend(native_spec)
    assert isinstance(backend, LlamaCppServerBackend)
    try:
        assert backend.server.engine == "native" and backend.server.parallel == 2
        assert backend.client.concurrency == 2, "the client keeps as many in flight as there are slots"
        assert backend.client.schema_mode == "json_schema", "llama-server's documented form"
        reqs = [
            Request.chat(
                f"Describe a book about {topic} as JSON with a title, a summary and a rating from 1 to 5.",
                schema=SCHEMA,
                sampling=Sampling(max_tokens=300, seed=i),
            )
            for i, topic in enumerate(["gardening", "tax law", "volcanoes", "chess"])
        ]
        comps = backend.generate(reqs)
        for comp in comps:
            assert comp.error is None and comp.finish_reasons == ["stop"], comp
            jsonschema.validate(json.loads(comp.text), SCHEMA)
        assert _metric(backend.base_url, "n_busy_slots_per_decode") > 1.0, "two slots decoded together"

        # the same seeded request, alone on the server, twice: the same text
        again = Request.chat("Name a colour.", sampling=Sampling(max_tokens=24, seed=7))
        first, second = backend.generate([again])[0], backend.generate([again])[0]
        assert first.error is None and first.text and first.text == second.text

        # more samples than slots: llama-server refuses n above its slot count, so they are split
        many = backend.generate(
            [Request.chat("Name a fruit.", sampling=Sampling(max_tokens=12, n=3, seed=3))]
        )[0]
        assert many.error is None and len(many.texts) == 3
        pid = backend.server.process.pid if backend.server.process else -1
    finally:
        backend.close()
    assert not backend.server.is_running()
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


_OWNER = """
import sys, time
from pathlib import Path
from speed.llm.server import LlamaCppServer
server = LlamaCppServer(sys.argv[1], engine="native", threads=1, n_ctx=512, log_path=sys.argv[2]).start()
pid = server.process.pid
children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
print(pid, *children, flush=True)
time.sleep(120)
"""


def test_a_native_server_never_outlives_an_owner_killed_outright(
    native_spec: LlamaCppServerSpec, smollm2_gguf: Path, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys
    import time

    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(smollm2_gguf), str(tmp_path / "s.log")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pids = [int(p) for p in (owner.stdout.readline() if owner.stdout else "").split()]
        assert len(pids) == 2, f"the watchdog and the llama-server binary; got {pids}"
        owner.send_signal(signal.SIGKILL)  # no atexit, no finally: the watchdog must end both
        owner.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), f"{pids} outlived their owner"
    finally:
        if owner.poll() is None:
            owner.kill()
