"""The Python API (`dmfuse_jax.load`, `Fuser`): shapes, dtypes, seeds, colour and medical routing,
bundles, checkpoint kinds. Tiny config with random params; every model call here is 1x64x64 (one
compile for the whole file)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import DATA, ROOT

from dmfuse_jax.data.images import read_image, rgb_to_ycbcr
from dmfuse_jax.errors import UserError
from dmfuse_jax.inference import bundle as bundle_lib
from dmfuse_jax.inference import buckets, checkpoints
from dmfuse_jax.inference.colour import FuseInputError
from dmfuse_jax.inference.fuser import Fuser, random_params


@pytest.fixture(scope="module")
def tiny_params(tiny_config):
    return random_params(tiny_config, seed=0)


@pytest.fixture(scope="module")
def fuser(tiny_config, tiny_params):
    return Fuser(config=tiny_config, params=tiny_params, seed=0)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, tiny_config, tiny_params):
    return bundle_lib.save_bundle(tmp_path_factory.mktemp("b") / "tiny", tiny_config, tiny_params,
                                  store_dtype="bfloat16", source="random")


def _tno_crop(name="07", box=(96, 150, 100, 156)):
    y0, y1, x0, x1 = box
    return (read_image(DATA / "tno" / "ir" / f"{name}.png")[y0:y1, x0:x1],
            read_image(DATA / "tno" / "vi" / f"{name}.png")[y0:y1, x0:x1])


def test_grey_pair_gives_grey_image_of_input_size_and_accepts_uint8_and_float(fuser):
    ir, vi = _tno_crop()
    out = fuser(ir, vi)
    assert out.shape == ir.shape[:2] and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.std() > 0
    ir8, vi8 = (np.rint(x[..., 0] * 255).astype(np.uint8) for x in (ir, vi))
    np.testing.assert_allclose(fuser(ir8, vi8), fuser(ir8 / 255.0, vi8 / 255.0), atol=1e-6)


def test_same_seed_same_output_other_seed_other_output(fuser, tiny_config, tiny_params):
    ir, vi = _tno_crop()
    a, b = fuser(ir, vi), fuser(ir, vi)
    np.testing.assert_array_equal(a, b)
    other = Fuser(config=tiny_config, params=tiny_params, seed=1)
    assert np.abs(other(ir, vi) - a).max() > 1e-4, "the seed does not reach the diffusion noise"


def test_ycbcr_round_trip_colour_image_with_itself_keeps_its_chroma(fuser):
    rgb = read_image(sorted((DATA / "roadscene" / "vi").iterdir())[0])[100:150, 200:260]
    assert rgb.shape[-1] == 3
    out = fuser(rgb, rgb)
    assert out.shape == rgb.shape
    # Where the new RGB is not clipped, Cb and Cr are exactly the input's.
    inside = np.all((out > 1e-3) & (out < 1 - 1e-3), axis=-1)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(rgb_to_ycbcr(out)[inside][:, 1:], rgb_to_ycbcr(rgb)[inside][:, 1:], atol=2e-3)


def test_medical_colour_image_keeps_chroma_on_either_side(fuser):
    pet = read_image(DATA / "harvard" / "MRI_PET" / "PET" / "11.png")[100:160, 90:150]
    mri = read_image(DATA / "harvard" / "MRI_PET" / "MRI" / "11.png")[100:160, 90:150]
    assert pet.shape[-1] == 3 and mri.shape[-1] == 1
    pet_first = fuser(pet, mri, mode="medical")
    pet_second = fuser(mri, pet, mode="medical")
    np.testing.assert_array_equal(pet_first, pet_second)  # the colour image always takes the visible role
    np.testing.assert_array_equal(fuser(pet, mri), pet_first)  # auto applies the same rule
    inside = np.all((pet_first > 1e-3) & (pet_first < 1 - 1e-3), axis=-1)
    np.testing.assert_allclose(rgb_to_ycbcr(pet_first)[inside][:, 1:], rgb_to_ycbcr(pet)[inside][:, 1:], atol=2e-3)
    # ir-vis keeps the roles: the colour infrared image is only its luminance, the output is grey
    assert fuser(pet, mri, mode="ir-vis").ndim == 2


def test_sixteen_bit_array_is_min_max_stretched(fuser):
    ir, vi = _tno_crop()
    raw = (20000 + 3000 * ir[..., 0]).astype(np.uint16)  # a thermal camera's 16-bit counts
    stretched = (raw - raw.min()) / float(raw.max() - raw.min())
    np.testing.assert_allclose(fuser(raw, vi), fuser(stretched.astype(np.float32), vi), atol=1e-6)


def test_bad_arrays_are_named_errors_and_rgba_is_composited_on_black(fuser):
    ir, vi = _tno_crop()
    with pytest.raises(FuseInputError, match=r"ir: unsupported image shape \(56, 56, 2\)"):
        fuser(np.zeros((56, 56, 2), np.uint8), vi)
    with pytest.raises(FuseInputError, match="vis: float values must lie in"):
        fuser(ir, vi * 255.0)
    with pytest.raises(FuseInputError, match="differs from vis"):
        fuser(ir[:40], vi)
    rgba = np.concatenate([np.repeat(vi, 3, -1), np.full(vi.shape, 0.5, np.float32)], -1)
    np.testing.assert_array_equal(fuser(ir, rgba), fuser(ir, vi * 0.5))  # colour x alpha: on black
    opaque = np.concatenate([np.repeat(vi, 3, -1), np.ones(vi.shape, np.float32)], -1)
    np.testing.assert_array_equal(fuser(ir, opaque), fuser(ir, vi))
    out = fuser(ir[:40], vi, resize=True)
    assert out.shape == vi.shape[:2]


def test_plan_batches_groups_by_bucket_and_pads_last_batch_only():
    sizes = [(50, 60), (64, 64), (65, 64), (10, 20), (40, 40)]
    plan = buckets.plan_batches(sizes, 64, batch_size=2)
    assert plan == [((2, 64, 64), [0, 1]), ((2, 64, 64), [3, 4]), ((1, 128, 64), [2])]
    x = np.arange(12, dtype=np.float32).reshape(3, 4, 1)
    padded = buckets.pad_to(x, (5, 6))
    assert padded.shape == (5, 6, 1)
    np.testing.assert_array_equal(padded[:3, :4], x)
    np.testing.assert_array_equal(padded[3, :4], x[1])  # reflection
    with pytest.raises(ValueError, match="multiple of the UNet stride"):
        buckets.check_multiple(40, 16)


def test_bundle_round_trip_bfloat16_storage_is_small(tiny_bundle, tiny_config, tiny_params):
    config, params, meta = bundle_lib.load_bundle(tiny_bundle)
    assert meta["param_dtype"] == "bfloat16" and meta["format"] == bundle_lib.FORMAT
    assert config.model.unet.inner_channels == tiny_config.model.unet.inner_channels
    assert tuple(config.model.unet.channel_mults) == tuple(tiny_config.model.unet.channel_mults)
    import jax
    import jax.numpy as jnp
    want = jax.tree_util.tree_map(lambda a: np.asarray(a.astype(jnp.bfloat16), np.float32), tiny_params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, want)
    assert bundle_lib.folder_bytes(tiny_bundle) < 4 * 2**20, "a bfloat16 tiny bundle must fit the 4 MB default"
    assert not list(tiny_bundle.parent.glob(".tiny.tmp-*")), "temporary folder left behind"
    with pytest.raises(UserError, match="already exists"):
        bundle_lib.save_bundle(tiny_bundle, config, params)


def test_load_bundle_and_default_bundle(tiny_bundle, monkeypatch, tmp_path):
    import dmfuse_jax

    ir, vi = _tno_crop()
    fz = dmfuse_jax.load(str(tiny_bundle))
    assert isinstance(fz, dmfuse_jax.Fuser)
    monkeypatch.setattr(checkpoints, "DEFAULT_BUNDLE", tiny_bundle)
    np.testing.assert_array_equal(dmfuse_jax.load()(ir, vi), fz(ir, vi))
    monkeypatch.setattr(checkpoints, "DEFAULT_BUNDLE", tmp_path / "missing")
    with pytest.raises(UserError, match="no default model is bundled"):
        dmfuse_jax.load()


QUICKSTART_BUNDLE = ROOT / "tests" / "data" / "quickstart_bundle"


def test_quickstart_test_bundle_loads_and_is_not_the_default():
    """The tiny quickstart model (3 CPU minutes of training) is test data, not the default model."""
    assert checkpoints.DEFAULT_BUNDLE.resolve() != QUICKSTART_BUNDLE.resolve()
    ck = checkpoints.resolve(str(QUICKSTART_BUNDLE))
    assert ck.kind == "bundle" and ck.config.model.unet.inner_channels == 8
    assert bundle_lib.folder_bytes(QUICKSTART_BUNDLE) < 2 * 2**20


def _fake_workdir(path, config, weights):
    """A workdir as `dmfuse train` leaves it, written with the training module's own names."""
    import orbax.checkpoint as ocp

    from dmfuse_jax import workdir as ck

    ck.write_config(path, config)
    mgr = ocp.CheckpointManager((path / ck.CHECKPOINT_DIR).absolute(),
                                item_names=("weights", "meta", "integrity"),
                                options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    meta = {"step": 3, "stage": config.get("stage", ""), "checksum": ck.CHECKSUM,
            "checksum_names": {"weights": ck.leaf_names(weights)}}
    mgr.save(3, args=ocp.args.Composite(weights=ocp.args.StandardSave(weights), meta=ocp.args.JsonSave(meta),
                                        integrity=ocp.args.PyTreeSave({"weights": ck.host_hashes(weights)})))
    mgr.wait_until_finished()
    mgr.close()
    return path


def test_training_workdir_fusion_stage_loads_ema_and_pretrain_stage_errors(tmp_path, tiny_config, tiny_params):
    import jax

    config = tiny_config.copy_and_resolve_references()
    with config.unlocked():
        config.stage = "fusion"
    ema_head = jax.tree_util.tree_map(lambda a: a + 1.0, tiny_params["head"])
    weights = {"params": {"head": tiny_params["head"]}, "ema_params": {"head": ema_head},
               "frozen": {"unet": tiny_params["unet"]}}
    wd = _fake_workdir(tmp_path / "fusion", config, weights)
    ck = checkpoints.resolve(str(wd))  # default: EMA when present
    assert ck.kind == "workdir"
    jax.tree_util.tree_map(np.testing.assert_array_equal, ck.params["head"], ema_head)
    raw = checkpoints.resolve(str(wd), ema=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, raw.params["head"], tiny_params["head"])

    with config.unlocked():
        config.stage = "pretrain"
    wd2 = _fake_workdir(tmp_path / "pretrain", config, {"params": tiny_params["unet"]})
    with pytest.raises(UserError, match="no fusion head"):
        checkpoints.resolve(str(wd2))


def test_not_a_checkpoint_and_other_config_are_named_errors(tmp_path, tiny_bundle):
    (tmp_path / "junk").mkdir()
    with pytest.raises(UserError, match="junk: not a checkpoint"):
        checkpoints.resolve(str(tmp_path / "junk"))
    with pytest.raises(UserError, match="does not fit the given --config"):
        checkpoints.resolve(str(tiny_bundle), config=str(ROOT / "configs" / "dmfuse_quarter.py"))
    with pytest.raises(UserError, match="pass --config"):
        checkpoints.resolve("a.pth,b.pth")
    meta = json.loads((tiny_bundle / bundle_lib.MARKER).read_text())
    assert meta["source"] == "random"


def test_merge_buckets_covers_every_image_with_at_most_max_buckets():
    # the 25 TNO pairs (H, W) rounded to 64: 8 shapes
    tno = ([(576, 768)] * 9 + [(450, 620)] * 6 + [(270, 360)] * 2 + [(475, 575), (512, 512), (256, 256),
           (328, 595), (551, 749), (480, 640), (371, 472), (496, 632)])
    base = [buckets.bucket_shape(h, w, 64) for h, w in tno]
    assert len(set(base)) == 8
    for k in (1, 2, 3, 8):
        to_bucket = buckets.merge_buckets(base, k)
        assert len(set(to_bucket.values())) == min(k, 8)
        assert all(b[0] >= s[0] and b[1] >= s[1] for s, b in to_bucket.items()), k
    assert buckets.merge_buckets(base, 8) == {s: s for s in base}
    assert set(buckets.merge_buckets(base, 1).values()) == {(576, 768)}
    plan = buckets.plan_batches(tno, 64, batch_size=4, max_buckets=3)
    assert len({shape[1:] for shape, _ in plan}) == 3 and sorted(i for _, idx in plan for i in idx) == list(range(25))
    with pytest.raises(ValueError, match="max_buckets"):
        buckets.merge_buckets(base, 0)


@pytest.mark.slow  # CI budget: test_fuse_cli's mixed-size folder test covers bucket merging end to end
def test_mixed_size_folder_compiles_at_most_max_buckets_times(tiny_config, tiny_params):
    from dmfuse_jax.inference import fuser as fuser_mod

    fuser = Fuser(config=tiny_config, params=tiny_params, bucket=32, max_buckets=2, seed=5)
    sizes = [(20, 30), (40, 24), (33, 50), (64, 64), (70, 40), (32, 32), (30, 62)]  # 6 shapes at 32
    rng = np.random.default_rng(0)
    irs = [rng.random(s + (1,), dtype=np.float32) for s in sizes]
    vis = [rng.random(s + (1,), dtype=np.float32) for s in sizes]
    traces = fuser_mod.TRACE_COUNT[0]
    out = fuser.fuse_luma(irs, vis, batch_size=3)
    assert fuser_mod.TRACE_COUNT[0] - traces == len(fuser.stats["compiled"]) <= 2, fuser.stats["compiled"]
    assert [o.shape for o in out] == [s + (1,) for s in sizes], "outputs cropped back to the input sizes"
    assert all(np.isfinite(o).all() and 0 <= o.min() and o.max() <= 1 for o in out)
