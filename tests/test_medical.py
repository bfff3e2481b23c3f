"""Medical fusion (issue 23): the written-down Harvard split, configs/harvard_fusion.py trains on its
train part only, `--mode medical` loads the shipped medical head (and only that mode does), and the
background check: on held-out pairs, pixels black in both sources stay black; the infrared-visible
default fuses the sample pairs as before."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import DATA, ROOT

from dmfuse_jax.data import harvard_split
from dmfuse_jax.data.images import match_pairs, read_image
from dmfuse_jax.errors import UserError
from dmfuse_jax.evaluation.background import background_level, black_mask
from dmfuse_jax.inference import bundle as bundle_lib
from dmfuse_jax.inference import checkpoints

# Two held-out pairs for the background check (MRI-CT and MRI-SPECT: grey and colour partners).
BACKGROUND_PAIRS = (("mri_ct", "12"), ("mri_spect", "13"))
# The three sample pairs fused by the default model before issue 23 (`dmfuse fuse --ir samples/ir
# --vis samples/vi` at commit 27434b3, float32 on CPU), 8-bit PNGs; 07_y64-192_x64-192.png: that
# 128x128 crop of pair 07 fused alone by `dmfuse_jax.load(None)` at 27434b3.
SAMPLES_FUSED = ROOT / "tests" / "data" / "samples_fused_default"


def _flat(tree):
    import jax
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_split_is_the_seeded_split_of_each_folder_and_disjoint(shared_dir):
    total_train = total_held = 0
    for name, (a, b) in harvard_split.FOLDERS.items():
        names = [n for n, _, _ in match_pairs(DATA / a, DATA / b)]
        train, held = harvard_split.split(names)
        assert (train, held) == (harvard_split.TRAIN[name], harvard_split.HELDOUT[name]), \
            f"{name}: the written lists are not split(names) at seed {harvard_split.SEED}"
        assert not set(train) & set(held) and sorted(train + held) == sorted(names), name
        assert len(held) == round(len(names) / 3), f"{name}: {len(held)} of {len(names)} held out"
        total_train, total_held = total_train + len(train), total_held + len(held)
    assert (total_train, total_held) == (91, 45)


def test_harvard_config_trains_on_the_train_split_only(shared_dir):
    from dmfuse_jax.config_lib import load_config
    from dmfuse_jax.training.fusion import FusionStage

    config = load_config(str(ROOT / "configs" / "harvard_fusion.py"))
    assert "ir_dir" not in config.data and "num_holdout" not in config.data, "the split replaces them"
    train, previews = FusionStage(config)._pairs()
    want = {f"{s}/{n}" for s, names in harvard_split.TRAIN.items() for n in names}
    assert {n for n, _, _ in train} == want
    held = {f"{s}/{n}" for s, names in harvard_split.HELDOUT.items() for n in names}
    assert not {n for n, _, _ in train} & held, "a held-out pair is in the training list"
    assert [n for n, _, _ in previews] == ["mri_ct/12", "mri_pet/18", "mri_spect/13"], "first held-out pair per set"
    ct11 = dict((n, (a, b)) for n, a, b in train)["mri_ct/11"]
    assert ct11[0].parent.name == "MRI" and ct11[1].parent.name == "CT", "MRI takes the infrared role"
    # the config's lists are what runs: dropping a name drops its pair
    config.data.sets.mri_ct.train = config.data.sets.mri_ct.train[1:]
    assert "mri_ct/11" not in {n for n, _, _ in FusionStage(config)._pairs()[0]}


def test_set_repeat_weights_a_set_and_is_checked(shared_dir):
    from dmfuse_jax.config_lib import load_config
    from dmfuse_jax.training.fusion import FusionStage

    config = load_config(str(ROOT / "configs" / "harvard_fusion.py"))
    config.data.sets.mri_pet.repeat = 3
    train, previews = FusionStage(config)._pairs()
    names = [n for n, _, _ in train]
    n_ct, n_pet, n_spect = (len(harvard_split.TRAIN[s]) for s in ("mri_ct", "mri_pet", "mri_spect"))
    assert len(names) == n_ct + 3 * n_pet + n_spect, "mri_pet's train pairs listed three times"
    assert all(names.count(f"mri_pet/{n}") == 3 for n in harvard_split.TRAIN["mri_pet"])
    assert all(names.count(f"mri_ct/{n}") == 1 for n in harvard_split.TRAIN["mri_ct"])
    assert [n for n, _, _ in previews] == ["mri_ct/12", "mri_pet/18", "mri_spect/13"], "first held-out pair per set"
    from dmfuse_jax.data.fusion_pairs import set_pairs
    from dmfuse_jax.data.pipeline import resolve_path
    held = [n for n, _, _ in set_pairs(config.data.sets.to_dict(), resolve_path)[1]]
    assert sorted(held) == sorted(f"{s}/{n}" for s, names in harvard_split.HELDOUT.items() for n in names), \
        "the held-out lists are not repeated"
    for bad in (0, -1):
        config.data.sets.mri_pet.repeat = bad
        with pytest.raises(UserError, match=r"data.sets.mri_pet.repeat: .*whole number >= 1"):
            FusionStage(config)._pairs()


def test_a_pair_in_both_lists_or_missing_is_refused(shared_dir):
    from dmfuse_jax.data.fusion_pairs import set_pairs

    a, b = (str(DATA / p) for p in harvard_split.FOLDERS["mri_ct"])
    with pytest.raises(UserError, match=r"mri_ct: pair\(s\) 12 are in both train and heldout"):
        set_pairs({"mri_ct": {"ir_dir": a, "vi_dir": b, "train": ("11", "12"), "heldout": ("12",)}})
    with pytest.raises(UserError, match=r"data.sets.mri_ct.heldout: no pair named 99"):
        set_pairs({"mri_ct": {"ir_dir": a, "vi_dir": b, "train": ("11",), "heldout": ("99",)}})


def test_background_level_counts_only_pixels_black_in_both():
    a = np.zeros((4, 4, 1), np.float32)
    b = np.zeros((4, 4, 3), np.float32)
    a[0] = 1.0  # row 0 bright in the MRI
    b[1, :, 0] = 2 / 255  # row 1: red at level 2 (luma < 1 level): still black
    b[2] = 3 / 255  # row 2: level 3, not black
    fused = np.full((4, 4), 5 / 255, np.float32)
    assert black_mask(a, b).sum() == 8  # rows 1 and 3
    level, share = background_level(fused, a, b)
    assert level == pytest.approx(5 / 255) and share == 0.5


def test_mode_medical_loads_the_medical_head_and_only_it(tiny_config, tmp_path, monkeypatch, capsys):
    """The plumbing, on a tiny bundle: the default model in mode medical is the bundle's UNet with the
    mode's head file; every other mode (and any explicit --checkpoint) keeps the bundle's head."""
    from dmfuse_jax.cli import main
    from dmfuse_jax.conversion.npz import save_npz
    from dmfuse_jax.inference.fuser import load, random_params

    params = random_params(tiny_config, seed=0)
    bundle = bundle_lib.save_bundle(tmp_path / "bundle", tiny_config, params)
    other = random_params(tiny_config, seed=1)["head"]
    save_npz(tmp_path / "medical_head.npz", other, dtype="float16")
    monkeypatch.setattr(checkpoints, "DEFAULT_BUNDLE", bundle)
    monkeypatch.setattr(checkpoints, "MODE_HEADS", {"medical": tmp_path / "medical_head.npz"})
    own = _flat(checkpoints.resolve(bundle).params)
    for mode in ("auto", "ir-vis"):
        assert all(np.array_equal(v, own[k]) for k, v in _flat(checkpoints.resolve(None, mode=mode).params).items()), \
            f"mode {mode} must use the default bundle's own params, bit for bit"
    med = checkpoints.resolve(None, mode="medical")
    assert "medical_head.npz" in med.source
    assert all(np.array_equal(v, own["['unet']" + k]) for k, v in _flat(med.params["unet"]).items()), "same UNet"
    want = _flat(other)
    got = _flat(med.params["head"])
    assert all(np.array_equal(got[k], want[k].astype(np.float16).astype(np.float32)) for k in want), "the head file"
    assert load(mode="medical").source == med.source, "dmfuse_jax.load(mode='medical')"
    assert "medical_head.npz" not in checkpoints.resolve(str(bundle), mode="medical").source

    ir = np.rint(read_image(DATA / "harvard/MRI_CT/MRI/12.png")[96:160, 96:160] * 255).astype(np.uint8)
    vi = np.rint(read_image(DATA / "harvard/MRI_CT/CT/12.png")[96:160, 96:160] * 255).astype(np.uint8)
    Image.fromarray(ir[..., 0]).save(tmp_path / "mri.png")
    Image.fromarray(vi[..., 0]).save(tmp_path / "ct.png")
    assert main(["fuse", "--mode", "medical", "--ir", str(tmp_path / "mri.png"), "--vis", str(tmp_path / "ct.png"),
                 "--out", str(tmp_path / "f.png"), "--no-progress"]) == 0
    assert "medical_head.npz" in capsys.readouterr().out, "dmfuse fuse --mode medical names the head it used"

    monkeypatch.setattr(checkpoints, "MODE_HEADS", {"medical": tmp_path / "missing.npz"})
    with pytest.raises(UserError, match="missing.npz is missing"):
        checkpoints.resolve(None, mode="medical")


def test_shipped_medical_head_is_small_and_a_whole_head():
    """Cheap: reads the npz; that it fits the default model is checked when the next test loads it."""
    from dmfuse_jax.conversion.npz import read_npz

    path = checkpoints.MODE_HEADS["medical"]
    assert path.parent == checkpoints.DEFAULT_BUNDLE.parent
    assert path.stat().st_size < 1.5 * 2**20, f"{path}: {path.stat().st_size} bytes, expected about 1 MB"
    flat = read_npz(path)
    assert sum(v.size for v in flat.values()) == 531_374 and all(k.split("/")[0] != "unet" for k in flat)


# CI: one held-out pair (whole: a crop would change the UNet's GroupNorm statistics, and the
# background of a 128x128 crop does not stay as black) and a 128x128 crop of sample 07; --runslow: both
# held-out pairs and the three whole sample pairs.
SIZES = {"ci": (BACKGROUND_PAIRS[:1], (64, 192, 64, 192)), "whole": (BACKGROUND_PAIRS, None)}


@pytest.mark.parametrize("size", ["ci", pytest.param("whole", marks=pytest.mark.slow)])
def test_medical_head_keeps_black_black_and_the_default_keeps_its_sample_outputs(shared_dir, size):
    """The real models: held-out Harvard pairs fused with `load(mode='medical')`: where both
    sources are black (<= 2/255) the fused image stays black (mean <= 3/255, median <= 1/255, at
    least 85% of those pixels <= 3/255; the default head gives about 24/255 everywhere there); the
    infrared-visible default fuses the sample pairs as before issue 23 (8-bit; at most 1 level off,
    from float reassociation across CPUs)."""
    from dmfuse_jax.inference.fuser import load

    pairs, box = SIZES[size]
    medical = load(mode="medical")
    for set_name, pair in pairs:
        assert pair in harvard_split.HELDOUT[set_name]
        a_dir, b_dir = harvard_split.FOLDERS[set_name]
        a, b = (read_image(DATA / d / f"{pair}.png") for d in (a_dir, b_dir))
        fused = np.rint(medical(a, b) * 255) / 255
        level, share = background_level(fused, a, b)
        assert share > 0.3, f"{set_name}/{pair}: only {share:.0%} of pixels black in both"
        assert level <= 3 / 255, f"{set_name}/{pair}: black background fused to {255 * level:.2f}/255"
        grey = fused if fused.ndim == 2 else 0.299 * fused[..., 0] + 0.587 * fused[..., 1] + 0.114 * fused[..., 2]
        bg = grey[black_mask(a, b)]
        assert np.median(bg) <= 1.01 / 255, f"{set_name}/{pair}: median black-background value {255 * np.median(bg)}/255"
        lit = np.mean(bg > 3.01 / 255)  # the default head: 100%; the medical head: 4% (CT) to 11% (SPECT), edge halo
        assert lit <= 0.15, f"{set_name}/{pair}: {lit:.1%} of the black background fused above 3/255"
    default = load()
    assert "medical" not in default.source
    for name in ("07",) if box else ("07", "19", "20"):
        ir, vi = (read_image(ROOT / "samples" / side / f"{name}.png") for side in ("ir", "vi"))
        if box:
            ir, vi = ir[box[0]:box[1], box[2]:box[3]], vi[box[0]:box[1], box[2]:box[3]]
        want = read_image(SAMPLES_FUSED / (f"{name}_y64-192_x64-192.png" if box else f"{name}.png"))[..., 0]
        diff = np.abs(np.rint(default(ir, vi) * 255) - np.rint(want * 255))
        assert diff.max() <= 1 and np.mean(diff > 0) < 0.01, \
            f"sample {name} fused by the default model changed: max {diff.max()} levels, {np.mean(diff > 0):.2%} of pixels"


def test_quality_script_split_heldout_uses_only_the_held_out_pairs(shared_dir, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_tno", ROOT / "benchmarks" / "quality_tno.py")
    q = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(q)
    out = tmp_path / "q"
    assert q.main(["--split", "heldout", "--datasets", "harvard_mri_ct", "--methods", "average", "--data", str(DATA),
                   "--out", str(out), "--fuse-only"]) == 0
    d = out / "harvard_mri_ct_heldout"
    want = sorted(f"{n}.png" for n in harvard_split.HELDOUT["mri_ct"])
    assert sorted(p.name for p in (d / "inputs" / "a").iterdir()) == want
    assert sorted(p.name for p in (d / "average").iterdir()) == want, "fused: the held-out pairs only"
    table = q.background_table(["average"], d / "inputs" / "a", d / "inputs" / "b", d)
    row = table.splitlines()[2].split("|")
    assert row[1].strip() == "average" and float(row[2]) <= 3.0, table  # averaging black with black stays black


@pytest.mark.parametrize("key,term", [("w_colour", "loss_colour"), ("w_edge", "loss_edge")])
def test_loss_w_colour_feeds_the_fusion_stage_the_colour_offsets(shared_dir, key, term):
    """loss.w_colour (or loss.w_edge) > 0: the stage's batches carry vi_chroma (the Harvard PET pairs'
    colour), and the loss adds the recoloured gradient (or edge-preservation) term; at 0 neither
    happens."""
    import jax

    from helpers import tiny_config
    from dmfuse_jax.training.fusion import FusionStage

    pet = str(DATA / harvard_split.FOLDERS["mri_pet"][0]), str(DATA / harvard_split.FOLDERS["mri_pet"][1])
    data = [f"data.ir_dir={pet[0]}", f"data.vi_dir={pet[1]}"]
    plain = FusionStage(tiny_config("fusion", data))
    colour = FusionStage(tiny_config("fusion", data + [f"loss.{key}=20.0"]))
    assert "vi_chroma" not in plain.example_batch(2) and plain.train_source(None)[0][0].keys() == {"ir", "vi"}
    assert colour.example_batch(2)["vi_chroma"].shape == (2, 16, 16, 3)
    source = colour.train_source(None)[0]
    el = next(source[i] for i in range(len(source)) if np.abs(source[i]["vi_chroma"]).max() > 0.05)
    batch = {k: jax.numpy.asarray(v)[None] for k, v in el.items()}
    params, frozen = colour.init_params(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)
    with_colour, aux = colour.loss(params, frozen, batch, key)
    without, aux0 = plain.loss(params, frozen, {k: batch[k] for k in ("ir", "vi")}, key)
    assert term in aux and term not in aux0
    np.testing.assert_allclose(float(with_colour), float(without) + 20.0 * float(aux[term]), rtol=1e-5)
