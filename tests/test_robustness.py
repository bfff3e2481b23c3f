"""Nothing lost, nothing silently wrong (issue 20), the in-process cases: `export --overwrite` replaces
only a bundle; one flipped byte in a bundle is caught; bad config values exit 2 before the workdir is
touched; inputs are decoded before the model loads, and pairs fused before a failure are written;
RGBA is composited on black; save failures are one line; the workdir lock; the content checksum;
the SLURM script requeues on the preempted exit code. (Checkpoints and the divergence guard:
test_checkpoint.py; the export's byte flip: test_export.py.)"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import helpers as T
from conftest import ROOT

from dmfuse_jax.cli import main
from dmfuse_jax.errors import EXIT_PREEMPTED, SaveFailed, UserError
from dmfuse_jax.inference import bundle as bundle_lib

QUICKSTART_BUNDLE = ROOT / "tests" / "data" / "quickstart_bundle"


def tree_state(folder: Path) -> dict:
    """{relative path: bytes} of every file under `folder`: to prove it was not touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def tiny_bundle():
    """A bundle the project wrote (the shipped quickstart one: no model to initialise here)."""
    return QUICKSTART_BUNDLE


def _run(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([*map(str, argv)])
    return rc, capsys.readouterr().err


# -- export --overwrite


def test_export_overwrite_refuses_a_workdir_and_a_users_folder_and_changes_nothing(tmp_path, tiny_bundle, capsys):
    workdir = tmp_path / "workdir"
    (workdir / "checkpoints" / "8").mkdir(parents=True)
    (workdir / "config.json").write_text("{}\n")
    (workdir / "checkpoints" / "8" / "weights").write_bytes(b"\x01" * 100)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine\n")
    for out in (workdir, notes):
        before = tree_state(out)
        rc, err = _run(capsys, "export", "--checkpoint", tiny_bundle, "--out", out, "--overwrite", "--no-artefact")
        assert rc == 2 and f"{out}: not an inference bundle" in err and len(err.strip().splitlines()) == 1, err
        assert tree_state(out) == before, f"{out} was changed"
    # A bundle someone added a file to: replacing it would delete that file.
    extra = tmp_path / "bundle_plus"
    shutil.copytree(tiny_bundle, extra)
    (extra / "README.txt").write_text("mine\n")
    rc, err = _run(capsys, "export", "--checkpoint", tiny_bundle, "--out", extra, "--overwrite", "--no-artefact")
    assert rc == 2 and "also holds README.txt" in err, err
    assert (extra / "README.txt").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle_plus", "notes", "workdir"], "temporary folders left"


def test_a_failed_overwrite_leaves_the_old_bundle_whole(tmp_path, tiny_bundle):
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    before = tree_state(out)
    config, params, _ = bundle_lib.load_bundle(tiny_bundle)

    def fail(tmp):
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        bundle_lib.save_bundle(out, config, params, overwrite=True, extra=fail)
    assert tree_state(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"], "temporary folders left"


# -- bundles: a sha256 manifest, checked on load


def test_one_flipped_byte_in_a_bundle_exits_2_naming_the_file_and_the_array(tmp_path, capsys):
    """The shipped quickstart bundle, copied, one byte of its largest params data file flipped."""
    bundle = tmp_path / "quickstart"
    shutil.copytree(QUICKSTART_BUNDLE, bundle)
    data = max((p for p in (bundle / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
    flip_byte(data, data.stat().st_size // 3)
    with pytest.raises(UserError, match=r"params: array \['\w+'\].* fails its sha256 check"):
        bundle_lib.load_bundle(bundle)
    ir = tmp_path / "ir.png"
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(ir)
    rc, err = _run(capsys, "fuse", "--checkpoint", bundle, "--ir", ir, "--vis", ir, "--out", tmp_path / "o.png",
                   "--no-progress")
    assert rc == 2 and f"{bundle / 'params'}: array [" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.png").exists()


def test_a_flat_version_3_bundle_names_a_flipped_byte_and_a_truncated_file(tmp_path):
    """Bundles are written as version 3 (one params.bin); the quickstart test bundle above is a version 2
    (orbax) bundle, which is still read."""
    from dmfuse_jax.config_lib import load_config
    from dmfuse_jax.models.params import random_params

    config = load_config(str(ROOT / "configs" / "tiny.py"))
    params = random_params(config, 0)
    out = bundle_lib.save_bundle(tmp_path / "b", config, params, store_dtype="bfloat16")
    assert bundle_lib.read_meta(out)["version"] == 3 and (out / bundle_lib.PARAMS_FILE).is_file()
    assert not (out / bundle_lib.PARAMS_DIR).exists()
    _, back, _ = bundle_lib.load_bundle(out)
    import jax
    import jax.numpy as jnp
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a).astype(jnp.bfloat16).astype(np.float32), b)
    data = out / bundle_lib.PARAMS_FILE
    flip_byte(data, data.stat().st_size // 2)
    with pytest.raises(UserError, match=r"params.bin: array \['\w+'\].* fails its sha256 check"):
        bundle_lib.load_bundle(out)
    flip_byte(data, data.stat().st_size // 2)
    bundle_lib.load_bundle(out)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 10)
    with pytest.raises(UserError, match="past the end of the file"):
        bundle_lib.load_bundle(out)


def test_shipped_bundles_carry_the_manifest_and_a_bundle_without_one_is_refused(tmp_path):
    from dmfuse_jax.inference.checkpoints import DEFAULT_BUNDLE

    for path, n in ((DEFAULT_BUNDLE, 407), (QUICKSTART_BUNDLE, 337)):
        meta = bundle_lib.read_meta(path)
        assert meta["checksum"] == "sha256" and len(meta["arrays"]) == n, path
    old = tmp_path / "old"
    shutil.copytree(QUICKSTART_BUNDLE, old)
    meta = bundle_lib.read_meta(old)
    del meta["arrays"], meta["checksum"]
    (old / bundle_lib.MARKER).write_text(__import__("json").dumps(meta))
    with pytest.raises(UserError, match="no sha256 manifest"):
        bundle_lib.load_bundle(old)


# -- config values: exit 2 before anything is written


@pytest.mark.parametrize("override", [
    "batch_size=0", "batch_size=-8", "total_steps=-5", "optimizer.learning_rate=-0.001",
    "optimizer.learning_rate=nan", "checkpoint_every_steps=0", "model.dtype=float16", "log_every_steps=0",
    "max_nonfinite_steps=-1", "sharding.mesh_shape=(3, 1)",
])
def test_bad_config_value_exits_2_and_leaves_the_workdir_untouched(tmp_path, capsys, override):
    workdir = tmp_path / "finished"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"stage": "fusion", "total_steps": 4}\n')
    (workdir / "metrics.jsonl").write_text('{"step": 4}\n')
    before = tree_state(workdir)
    rc, err = _run(capsys, "train", "--config", T.FUSION_CONFIG, "--workdir", workdir, f"--config.{override}")
    key = override.split("=")[0]
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert key in err or "mesh_shape" in err, err
    assert tree_state(workdir) == before, "the workdir was changed"


def test_validate_config_names_the_key_and_the_range():
    from dmfuse_jax.config_lib import load_config, validate_config

    config = load_config(T.PRETRAIN_CONFIG)
    validate_config(config)
    with config.unlocked():
        config.model.timesteps = (5, 5000)
    with pytest.raises(UserError, match=r"model.timesteps = \(5, 5000\): must be integers in \[0, 1000\)"):
        validate_config(config)
    with pytest.raises(UserError, match=r"optimizer.b2 = 1.0: must be a finite number >= 0 and < 1"):
        load_config(T.PRETRAIN_CONFIG, ["optimizer.b2=1.0"])


# -- inputs


def _png(path: Path, array) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return path


def test_a_truncated_input_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from dmfuse_jax.inference import checkpoints

    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        for side in ("ir", "vi"):
            _png(tmp_path / side / f"{name}.png", rng.integers(0, 256, (64, 64)))
    bad = tmp_path / "vi" / "c.png"
    bad.write_bytes(bad.read_bytes()[:300])  # the header is valid: only a full decode finds it

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before every input was verified")

    monkeypatch.setattr(checkpoints, "resolve", no_model)
    rc, err = _run(capsys, "fuse", "--ir", tmp_path / "ir", "--vis", tmp_path / "vi", "--out", tmp_path / "out",
                   "--no-progress")
    assert rc == 2 and f"{bad}: cannot read image" in err, err
    assert not (tmp_path / "out").exists()


def test_pairs_fused_before_a_failure_are_written(tmp_path, capsys, monkeypatch):
    from dmfuse_jax.data import images

    rng = np.random.default_rng(1)
    for name in ("a", "b", "c", "d"):
        for side in ("ir", "vi"):
            _png(tmp_path / side / f"{name}.png", rng.integers(0, 256, (40 + ord(name), 48)))
    real = images.read_image

    def read_image(path, **kw):  # the file is gone by the time its batch is read
        if Path(path).stem == "c":
            raise UserError(f"{path}: no such file")
        return real(path, **kw)

    monkeypatch.setattr(images, "read_image", read_image)
    out = tmp_path / "out"
    rc, err = _run(capsys, "fuse", "--method", "average", "--ir", tmp_path / "ir", "--vis", tmp_path / "vi",
                   "--out", out, "--batch-size", "1", "--no-progress", "--max-buckets", "0")
    assert rc == 2 and "c.png: no such file" in err and "2 of 4 pairs were written" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"], "the pair fused before the failure was lost"


def test_rgba_files_are_composited_on_black(tmp_path):
    from dmfuse_jax.data.images import read_image

    rgb = np.random.default_rng(2).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    alpha = np.zeros((8, 10, 1), np.uint8)
    alpha[:, 5:] = 255  # left half transparent, right half opaque
    path = tmp_path / "rgba.png"
    Image.fromarray(np.concatenate([rgb, alpha], -1), mode="RGBA").save(path)
    got = read_image(path)
    assert got.shape == (8, 10, 3)
    np.testing.assert_array_equal(got[:, :5], 0.0)
    np.testing.assert_allclose(got[:, 5:], rgb[:, 5:] / 255.0, atol=1e-7)
    la = tmp_path / "la.png"
    Image.fromarray(np.concatenate([rgb[..., :1], np.full((8, 10, 1), 51, np.uint8)], -1), mode="LA").save(la)
    np.testing.assert_allclose(read_image(la), rgb[..., :1] / 255.0 * 0.2, atol=1e-6)


# -- saves: system failures are one line


def test_disk_full_during_a_save_is_one_line(tmp_path):
    import orbax.checkpoint as ocp

    from dmfuse_jax.training.checkpoint import Checkpointer, system_failure

    assert system_failure(ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device"))
    assert system_failure(OSError(122, "Disk quota exceeded", "/w/x")) == "disk quota exceeded (/w/x)"
    assert system_failure(ValueError("NOT_FOUND: a missing file")) is None
    ckpt = Checkpointer(tmp_path / "w", every=2, async_save=False)

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "w" / "checkpoints" / "2"))

    ckpt.manager.save = full
    with pytest.raises(SaveFailed, match=r"saving checkpoints in .* failed at step 2: no space left on the device "
                                         r"\(.*checkpoints/2\); the checkpoints committed before it are intact "
                                         r"\(latest: none\)") as e:
        ckpt.save(2, state=_FakeState(), data_iter=None)
    assert "\n" not in str(e.value) and e.value.exit_code == 1
    ckpt.manager.wait_until_finished = lambda: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
    with pytest.raises(SaveFailed, match="permission denied"):
        ckpt.wait()
    ckpt.abandon()  # never raises


class _FakeState:
    def split_items(self):
        return {"params": np.zeros(3, np.float32)}, {"step": np.int32(2)}


# -- the workdir lock


def test_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    from dmfuse_jax.training.lock import LOCK_FILE, StaleLockWarning, WorkdirLock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from dmfuse_jax.training.lock import WorkdirLock\n"
        "WorkdirLock(%r).acquire(); print('locked', flush=True); time.sleep(60)") % (str(ROOT), str(tmp_path))],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"another dmfuse train is writing this workdir \(pid {holder.pid} on "
                                            r"host .*, started 20\d\d-"):
            WorkdirLock(tmp_path).acquire()
    finally:
        holder.kill()  # dies holding it: the kernel lock goes, its text stays
        holder.wait()
    assert str(holder.pid) in (tmp_path / LOCK_FILE).read_text()
    with pytest.warns(StaleLockWarning, match=rf"taking over the lock left by pid {holder.pid}"):
        lock = WorkdirLock(tmp_path).acquire()
    assert str(os.getpid()) in (tmp_path / LOCK_FILE).read_text()
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == "", "a clean release leaves no holder"
    with WorkdirLock(tmp_path):  # free again: no warning
        pass


# -- the content checksum of checkpoints


def test_content_hash_catches_any_one_byte_flip_same_on_host_and_device():
    import jax
    import jax.numpy as jnp

    from dmfuse_jax import workdir as ck

    rng = np.random.default_rng(0)
    tree = {"f32": rng.standard_normal((5, 7)).astype(np.float32), "i32": np.arange(6, dtype=np.int32) - 3,
            "bf16": jnp.asarray(rng.standard_normal(9), jnp.bfloat16), "u32": np.array([1, 2], np.uint32),
            "scalar": np.float32(3.5), "flag": np.array([True, False])}
    host = {k: np.asarray(v) for k, v in tree.items()}
    before = ck._hashes_fn()._cache_size()
    on_device = [np.asarray(ck.array_hashes(jax.tree.map(jnp.asarray, host))) for _ in range(3)]
    assert ck._hashes_fn()._cache_size() - before == 1, "compiled more than once for one layout"
    assert on_device[0].shape == (len(host),) and on_device[0].dtype == np.uint32
    np.testing.assert_array_equal(on_device[0], ck.host_hashes(host))
    names = ck.leaf_names(host)
    ck.compare_hashes(names, ck.host_hashes(host), on_device[0], "x")
    raw = host["f32"].copy().reshape(-1).view(np.uint8)
    for offset in range(raw.size):  # every byte of the array, one at a time
        flipped = raw.copy()
        flipped[offset] ^= 0x01
        damaged = {**host, "f32": flipped.view(np.float32).reshape(5, 7)}
        assert not np.array_equal(ck.host_hashes(damaged), on_device[0]), offset
    with pytest.raises(ck.IntegrityError, match=r"array \['f32'\] fails its content checksum"):
        ck.compare_hashes(names, ck.host_hashes(damaged), on_device[0], "x")


# -- the SLURM script requeues a preempted run


def test_slurm_script_requeues_on_the_preempted_exit_code(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", f"exit ${{FAKE_RC}}"), ("scontrol", f'echo "$@" >> {tmp_path}/scontrol.log')):
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    script = str(ROOT / "launch" / "slurm_gpu.sbatch")
    for rc, requeued in ((EXIT_PREEMPTED, True), (0, False), (3, False)):
        log = tmp_path / "scontrol.log"
        log.unlink(missing_ok=True)
        got = subprocess.run(["bash", script, "configs/coco_pretrain.py", "/w"], env={**env, "FAKE_RC": str(rc)},
                             capture_output=True, text=True, timeout=60)
        assert got.returncode == (0 if requeued else rc), got.stderr
        assert (log.read_text().split() == ["requeue", "4242"]) if requeued else not log.exists()


# -- the divergence guard's skip budget (the learning-rate blow-up itself: test_checkpoint.py)


def test_a_nonfinite_step_is_not_applied_and_the_guard_skips_up_to_its_budget(capsys):
    import jax
    import jax.numpy as jnp
    import optax

    from dmfuse_jax.errors import TrainingDiverged
    from dmfuse_jax.training.state import initial_state
    from dmfuse_jax.training.trainer import FiniteGuard, make_train_step

    class Toy:  # a stage: loss = sum(w * x); a batch holding NaN makes it non-finite
        def loss(self, params, frozen, batch, key):
            return jnp.sum(params["w"] * batch["x"]), {}

    tx = optax.adam(0.1)
    step = jax.jit(make_train_step(Toy(), tx, ema_decay=0.5))
    state = initial_state({"w": jnp.ones(3)}, {}, tx, jax.random.PRNGKey(0))
    good, bad = {"x": jnp.ones(3)}, {"x": jnp.array([1.0, jnp.nan, 1.0])}
    s1, m1 = step(state, good)
    s2, m2 = step(s1, bad)
    s3, m3 = step(s2, good)
    assert [int(m["nonfinite"]) for m in (m1, m2, m3)] == [0, 1, 0]
    for before, after in ((s1.params, s2.params), (s1.opt_state, s2.opt_state), (s1.ema_params, s2.ema_params)):
        jax.tree.map(np.testing.assert_array_equal, before, after)  # the bad step changed nothing...
    assert int(s2.step) == 2 and not np.array_equal(s1.rng, s2.rng)  # ...but the counter and the key
    assert not np.array_equal(s2.params["w"], s3.params["w"]) and np.all(np.isfinite(s3.params["w"]))

    guard = FiniteGuard(max_skipped=1, chief=True)
    for i, m in enumerate((m1, m2, m3), start=1):
        guard.add(i, m)
    guard.check(last_checkpoint=None)
    assert guard.skipped == [2] and "step 2: non-finite loss (nan)" in capsys.readouterr().out
    guard.add(4, m2)
    with pytest.raises(TrainingDiverged, match=r"step 4: non-finite loss \(nan\).*\(last checkpoint: none yet"):
        guard.check(last_checkpoint=None)
