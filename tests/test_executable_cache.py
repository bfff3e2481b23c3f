"""The executable cache (`dmfuse_jax/executable_cache.py`): a warm Fuser loads its executable without
tracing and fuses bit-identically; a changed config, dtype, jax version or source never reuses an
entry; a damaged or foreign entry is reported and recompiled; writes are atomic. Tiny config, 64x64."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from dmfuse_jax import executable_cache
from dmfuse_jax.inference import fuser as fuser_mod
from dmfuse_jax.inference.fuser import Fuser, random_params


@pytest.fixture
def cache(tmp_path):
    executable_cache.configure(tmp_path)
    fuser_mod._EXECUTABLES.clear()
    yield tmp_path / executable_cache.SUBDIR
    executable_cache.configure(None)
    fuser_mod._EXECUTABLES.clear()


@pytest.fixture(scope="module")
def params(tiny_config):
    return random_params(tiny_config, seed=0)


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    ir = rng.random((64, 64, 1), dtype=np.float32)
    vi = np.clip(0.5 * ir + 0.5 * rng.random((64, 64, 1), dtype=np.float32), 0, 1)
    return ir, vi


def fuse_fresh(config, params, pair, **kw):
    """A new process in miniature: the in-process executable table emptied, then one fuse."""
    fuser_mod._EXECUTABLES.clear()
    fuser_mod._jitted.cache_clear()  # jax.jit's own trace cache would hide a trace
    f = Fuser(config=config, params=params, **kw)
    traces = fuser_mod.TRACE_COUNT[0]
    out = f.fuse_luma([pair[0]], [pair[1]])[0]
    return f, out, fuser_mod.TRACE_COUNT[0] - traces


def test_warm_fuser_loads_without_tracing_and_fuses_bit_identically(cache, tiny_config, params, pair):
    cold, a, cold_traces = fuse_fresh(tiny_config, params, pair)
    assert cold.stats["compiled"] == [(1, 64, 64)] and cold.stats["loaded"] == [] and cold_traces == 1
    entries = sorted(p.name for p in cache.glob("fuse-*.bin"))
    assert len(entries) == 1, entries
    warm, b, warm_traces = fuse_fresh(tiny_config, params, pair)
    assert warm.stats["loaded"] == [(1, 64, 64)] and warm.stats["compiled"] == [], warm.stats
    assert warm_traces == 0, "a warm start traced the fuse function"
    assert warm.stats["trace_s"] == warm.stats["lower_s"] == warm.stats["compile_s"] == 0.0
    np.testing.assert_array_equal(a, b)
    assert not list(cache.glob(".*")), "temporary files left in the cache folder"


def test_a_changed_config_dtype_or_jax_version_never_reuses_an_entry(cache, tiny_config, params, pair,
                                                                     monkeypatch):
    """One compile writes the entry; every change that makes another program misses it (`read` is
    what the Fuser asks first); then one compile of a changed config shows it gives other pixels."""
    import jax

    base, a, _ = fuse_fresh(tiny_config, params, pair)
    program = base.program(1, 64, 64)
    assert executable_cache.read("fuse", program) is not None
    other = tiny_config.copy_and_resolve_references()
    with other.unlocked():
        other.diffusion.cosine_s = 0.02  # changes the noise schedule, not the param shapes
    for what, fuser in (("config", Fuser(config=other, params=params)),
                        ("dtype", Fuser(config=tiny_config, params=params, dtype="bfloat16")),
                        ("batch", base), ("bucket", base)):
        prog = fuser.program(2 if what == "batch" else 1, 64, 128 if what == "bucket" else 64)
        assert prog != program and executable_cache.read("fuse", prog) is None, f"a changed {what} reused an entry"
    assert base.program(1, 64, 64, "sequential") != program
    for attr, obj, value in (("__version__", jax, jax.__version__ + ".post999"),
                             ("source_digest", executable_cache, lambda: "edited")):
        with monkeypatch.context() as m:
            m.setattr(obj, attr, value)
            assert executable_cache.read("fuse", program) is None, f"a changed {attr} reused an entry"
    with monkeypatch.context() as m:
        m.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
        assert executable_cache.read("fuse", program) is None, "changed XLA_FLAGS reused an entry"
    assert executable_cache.read("fuse", program) is not None, "the original entry should still serve"
    f, b, _ = fuse_fresh(other, params, pair)
    assert f.stats["compiled"] and not f.stats["loaded"] and np.abs(a - b).max() > 0


def test_a_damaged_or_foreign_entry_is_reported_recompiled_and_rewritten(cache, tiny_config, params, pair):
    import json

    _, a, _ = fuse_fresh(tiny_config, params, pair)
    (entry,) = cache.glob("fuse-*.bin")
    data = bytearray(entry.read_bytes())
    data[-100] ^= 0xFF
    entry.write_bytes(bytes(data))
    f, b, _ = fuse_fresh(tiny_config, params, pair)
    assert f.stats["compiled"] and not f.stats["loaded"]
    assert any("fails its sha256 check" in n for n in f.notes), f.notes
    np.testing.assert_array_equal(a, b)
    # another program's entry under this program's name: its header's identity does not match
    header, payload = entry.read_bytes().split(b"\n", 1)
    meta = json.loads(header)
    meta["identity"]["program"]["batch"] = 7
    entry.write_bytes(json.dumps(meta).encode() + b"\n" + payload)
    f, c, _ = fuse_fresh(tiny_config, params, pair)
    assert f.stats["compiled"] and any("another program or environment" in n for n in f.notes), f.notes
    np.testing.assert_array_equal(a, c)
    f, _, _ = fuse_fresh(tiny_config, params, pair)
    assert f.stats["loaded"] and not f.stats["compiled"], "the bad entry was not rewritten"


def test_cache_off_writes_nothing_and_a_failed_write_leaves_no_file(tmp_path, tiny_config, params, pair,
                                                                   monkeypatch):
    monkeypatch.setenv(executable_cache.OFF_ENV, "off")
    assert executable_cache.configure(tmp_path) is None
    f, _, _ = fuse_fresh(tiny_config, params, pair)
    assert f.stats["compiled"] and not (tmp_path / executable_cache.SUBDIR).exists()
    monkeypatch.delenv(executable_cache.OFF_ENV)
    executable_cache.configure(tmp_path)
    try:
        def no_rename(*a):
            raise OSError("disk full")
        monkeypatch.setattr(executable_cache.os, "replace", no_rename)
        assert executable_cache.write("x", {"a": 1}, b"payload") is None
        assert list((tmp_path / executable_cache.SUBDIR).iterdir()) == [], "a half-written entry is left"
        monkeypatch.undo()
        assert executable_cache.write("x", {"a": 1}, b"payload") is not None
        assert executable_cache.read("x", {"a": 1}) == b"payload"
        assert executable_cache.read("x", {"a": 2}) is None
    finally:
        executable_cache.configure(None)


def test_a_second_dmfuse_fuse_process_loads_every_executable_and_writes_the_same_pngs(tmp_path):
    """Three real processes over one cache folder (the quickstart test bundle, two sizes = two buckets):
    the first with the executable cache off (JAX's persistent cache only), the second compiles and
    stores (bypassing JAX's cache: an executable JAX's cache deserialized does not serialize whole on
    XLA:CPU), the third traces nothing (0 compiled, 2 loaded); all write byte-identical PNGs.
    --timings-json holds the start-up phases."""
    import json
    import subprocess
    import sys

    from PIL import Image

    import helpers as T
    from conftest import ROOT

    rng = np.random.default_rng(1)
    for sub in ("ir", "vi"):
        (tmp_path / sub).mkdir()
        for name, (h, w) in (("a", (40, 48)), ("b", (70, 90))):
            Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(tmp_path / sub / f"{name}.png")
    runs = []
    for i, cache_switch in enumerate(("off", "on", "on")):
        env = T.subprocess_env(**{executable_cache.OFF_ENV: cache_switch})
        env.pop("DMFUSE_COMPILATION_CACHE", None)
        out, timings = tmp_path / f"out{i}", tmp_path / f"t{i}.json"
        res = subprocess.run([sys.executable, "-m", "dmfuse_jax", "fuse", "--checkpoint",
                              str(ROOT / "tests" / "data" / "quickstart_bundle"), "--ir", str(tmp_path / "ir"),
                              "--vis", str(tmp_path / "vi"), "--out", str(out), "--no-progress", "--bucket", "32",
                              "--compilation-cache", str(tmp_path / "cache"), "--timings-json", str(timings)],
                             env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        runs.append((json.loads(timings.read_text()), {p.name: p.read_bytes() for p in out.glob("*.png")}, res.stdout))
    (jax_only, png0, _), (cold, cold_png, _), (warm, warm_png, warm_out) = runs
    assert (jax_only["counts"]["compiled"], jax_only["counts"]["loaded"]) == (2, 0), jax_only
    assert (cold["counts"]["compiled"], cold["counts"]["loaded"]) == (2, 0), cold
    assert (warm["counts"]["compiled"], warm["counts"]["loaded"]) == (0, 2), warm
    assert warm["counts"]["trace_s"] == 0.0
    assert set(cold["seconds"]) >= {"imports", "inputs", "bundle", "executables", "first batch"}
    assert sorted(cold_png) == ["a.png", "b.png"] and png0 == cold_png == warm_png, "the three runs differ"
    assert "2 loaded from the executable cache" in warm_out and "start-up" in warm_out, warm_out
