"""`dmfuse export`: the bundle, the `jax.export` artefact (through its standalone loader) and the
live model agree on a TNO pair; the loader needs only jax and numpy; shapes are symbolic."""
from __future__ import annotations

import ast
import importlib.util
import json

import numpy as np
import pytest

from conftest import DATA

from dmfuse_jax import compilation
from dmfuse_jax.cli import main
from dmfuse_jax.data.images import read_image
from dmfuse_jax.inference import bundle as bundle_lib
from dmfuse_jax.inference import export as export_lib
from dmfuse_jax.inference.fuser import Fuser, load, random_params


@pytest.fixture(scope="module")
def tiny_params(tiny_config):
    return random_params(tiny_config, seed=3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_config, tiny_params):
    root = tmp_path_factory.mktemp("exp")
    src = bundle_lib.save_bundle(root / "src", tiny_config, tiny_params)
    assert main(["export", "--checkpoint", str(src), "--out", str(root / "out")]) == 0
    return root / "out"


def _import_loader(path):
    spec = importlib.util.spec_from_file_location("dmfuse_export_loader_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bundle_artefact_and_live_model_agree_on_a_tno_pair(exported, tiny_config, tiny_params):
    ir = read_image(DATA / "tno" / "ir" / "01.png")[300:350, 400:460]
    vi = read_image(DATA / "tno" / "vi" / "01.png")[300:350, 400:460]
    live = Fuser(config=tiny_config, params=tiny_params)(ir, vi)
    from_bundle = load(str(exported))(ir, vi)
    loader = _import_loader(exported / export_lib.EXPORT_DIR / export_lib.LOADER)
    from_artefact = loader.load(exported / export_lib.EXPORT_DIR)(ir, vi)
    assert live.shape == from_bundle.shape == from_artefact.shape == (50, 60)
    assert live.std() > 1e-3
    np.testing.assert_allclose(from_bundle, live, atol=1e-5)
    np.testing.assert_allclose(from_artefact, live, atol=1e-5)


def test_artefact_has_symbolic_batch_height_width(exported):
    from jax import export as jax_export

    folder = exported / export_lib.EXPORT_DIR
    exp = jax_export.deserialize(bytearray((folder / export_lib.ARTEFACT).read_bytes()))
    img = exp.in_avals[-3]
    assert [str(d) for d in img.shape] == ["b", "16*h", "16*w", "1"]
    assert set(exp.platforms) == {"cpu", "cuda"}
    meta = json.loads((folder / export_lib.META).read_text())
    assert meta["bucket_multiple"] == 64 and meta["min_size"] == 32 and meta["n_params"] == len(exp.in_avals) - 3
    # the standalone loader compiles with the same XLA options as dmfuse (none listed for cuda)
    assert meta["compiler_options"] == {"cpu": compilation.BACKEND_OPTIONS["cpu"]}


def test_standalone_loader_uses_the_exports_compiler_options_on_cpu(exported):
    loader = _import_loader(exported / export_lib.EXPORT_DIR / export_lib.LOADER)
    fuser = loader.load(exported / export_lib.EXPORT_DIR)
    assert fuser._compiler_options() == compilation.compiler_options()


def test_standalone_loader_imports_only_jax_and_numpy():
    src = (export_lib.Path(export_lib.__file__).with_name("standalone_loader.py")).read_text()
    roots = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots <= {"__future__", "hashlib", "json", "os", "sys", "zipfile", "jax", "numpy"}, roots


def test_bfloat16_export_stores_half_size_params_and_refuses_to_overwrite(exported, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["export", "--checkpoint", str(exported), "--out", str(out), "--dtype", "bfloat16"]) == 0
    meta = json.loads((out / bundle_lib.MARKER).read_text())
    assert meta["param_dtype"] == "bfloat16" and meta["compute_dtype"] == "bfloat16"
    config, _, _ = bundle_lib.load_bundle(out)
    assert config.model.dtype == "bfloat16"
    emeta = json.loads((out / "export" / export_lib.META).read_text())
    assert emeta["param_dtype"] == "bfloat16"
    with np.load(out / "export" / export_lib.PARAMS) as z:
        assert z["p0000"].dtype == np.uint16
    full = bundle_lib.params_bytes(exported)
    assert bundle_lib.params_bytes(out) < 0.6 * full
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(exported), "--out", str(out), "--no-artefact"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(exported), "--out", str(out), "--no-artefact", "--overwrite",
                 "--store-dtype", "float16"]) == 0
    assert json.loads((out / bundle_lib.MARKER).read_text())["param_dtype"] == "float16"
    assert not (out / "export").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bf16"], "temporary folders left behind"


def test_one_flipped_byte_in_the_export_is_one_line_naming_the_file_and_the_array(exported, tmp_path):
    """params.npz (a byte inside one array's data), then fuse.jaxexport: the loader raises ExportError
    naming the file (and the array); run as a script it prints that one line and exits 2."""
    import shutil
    import subprocess
    import sys

    src = exported / export_lib.EXPORT_DIR
    loader_path = src / export_lib.LOADER
    loader = _import_loader(loader_path)
    assert loader.main([str(src)]) == 0
    with np.load(src / export_lib.PARAMS) as z:
        target = z["p0005"]
    for name in (export_lib.PARAMS, export_lib.ARTEFACT):
        bad = tmp_path / name.replace(".", "_")
        shutil.copytree(src, bad)
        data = bytearray((bad / name).read_bytes())
        offset = data.find(target.tobytes()) + 3 if name == export_lib.PARAMS else len(data) // 2
        assert offset > 3
        data[offset] ^= 0x01
        (bad / name).write_bytes(bytes(data))
        expect = r"params\.npz: array p0005 (is damaged|fails its sha256)" if name == export_lib.PARAMS else \
            r"fuse\.jaxexport: fails its sha256 check"
        with pytest.raises(loader.ExportError, match=expect):
            loader.load(bad)
        if name == export_lib.PARAMS:  # the script, in a process of its own (a raw BadZipFile before)
            got = subprocess.run([sys.executable, str(loader_path), str(bad)], capture_output=True, text=True,
                                 timeout=120)
            assert got.returncode == 2 and "Traceback" not in got.stderr, got.stderr
            assert len(got.stderr.strip().splitlines()) == 1 and str(bad / name) in got.stderr, got.stderr
