"""Grain pipelines: sources, transforms, deterministic order, process sharding, checkpointable state,
error reporting (corrupt files, empty sources, unmatched names, size mismatches)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from dmfuse_jax.data import fusion_pairs as fp
from dmfuse_jax.data import pipeline as pl
from dmfuse_jax.data.images import LUMA
from dmfuse_jax.data.pretrain import ImageFolderSource, PretrainTransform, cached_file_list, scan_image_tree
from dmfuse_jax.errors import UserError


def write_png(path, h, w, value=None, rgb=False, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if rgb else (h, w)
    arr = rng.integers(0, 256, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    Image.fromarray(arr).save(path)
    return arr


@pytest.fixture
def image_tree(tmp_path):
    root = tmp_path / "train2017"
    for i in range(5):
        write_png(root / ("a" if i % 2 else "b") / f"img{i}.png", 20 + i, 24, value=10 * i)
    write_png(root / "rgb.jpg", 30, 30, rgb=True)
    (root / "notes.txt").write_text("not an image")
    return root


def test_scan_finds_images_recursively_sorted_and_caches(image_tree, tmp_path):
    files = scan_image_tree(image_tree)
    assert len(files) == 6 and files == sorted(files) and "a/img1.png" in files
    cache = tmp_path / "filelist.json"
    assert cached_file_list(image_tree, cache) == files and cache.is_file()
    write_png(image_tree / "late.png", 20, 20)  # added later: the cached list pins the order
    assert cached_file_list(image_tree, cache) == files


def test_empty_and_missing_folders_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        scan_image_tree(tmp_path / "empty")
    with pytest.raises(UserError, match="no such folder"):
        scan_image_tree(tmp_path / "missing")
    with pytest.raises(UserError, match="empty"):
        pl.train_dataset([], None, seed=0, global_batch=2)


def test_corrupt_file_is_skipped_with_warning_and_count(image_tree, caplog):
    (image_tree / "b" / "img0.png").write_bytes(b"\x89PNG broken")
    src = ImageFolderSource(image_tree)
    idx = src.files.index("b/img0.png")
    with caplog.at_level(logging.WARNING):
        el = src[idx]
        src[idx]
    assert el["image"].shape[-1] in (1, 3) and el["skipped"] == 1  # the count travels with the element
    assert src[(idx + 1) % len(src)]["skipped"] == 0
    assert sum("b/img0.png" in r.getMessage() for r in caplog.records) == 1  # warned once per file
    np.testing.assert_array_equal(el["image"], src[(idx + 1) % len(src)]["image"])  # the next readable file


def test_sources_and_transform_pickle_for_worker_processes(image_tree, pair_dirs):
    """grain sends the dataset to its worker processes with cloudpickle: no locks, no decoded cache."""
    import cloudpickle

    folder = ImageFolderSource(image_tree)
    folder[0]
    train, _ = fp.split_pairs(*pair_dirs)
    pairs = fp.PairedPatchSource(train, patch=16, step=12)
    pairs[0]  # fills the decoded-pair cache
    assert pairs._cache
    transform = PretrainTransform(16, 1)
    for obj in (folder, pairs, transform):
        copy = cloudpickle.loads(cloudpickle.dumps(obj))
        assert type(copy) is type(obj)
    copy = cloudpickle.loads(cloudpickle.dumps(pairs))
    assert copy._cache == {}  # each worker decodes its own pairs
    for k in ("ir", "vi"):
        np.testing.assert_array_equal(copy[5][k], pairs[5][k])


def test_pretrain_transform_crops_flips_and_scales():
    rng = np.random.default_rng(0)
    img = np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30, 1)
    out = PretrainTransform(16, 3, "grey")({"image": img, "skipped": np.int32(2)}, rng)
    assert out["skipped"] == 2
    out = out["image"]
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    assert -1.0 <= out.min() and out.max() <= 1.0 and np.all(out[..., 0] == out[..., 2])
    small = PretrainTransform(32, 1, "grey")({"image": img}, rng)["image"]  # upscaled before the crop
    assert small.shape == (32, 32, 1)
    rgb = PretrainTransform(8, 3, "rgb", mode="resize", flip=False)({"image": np.ones((10, 12, 3), np.float32)}, rng)
    np.testing.assert_allclose(rgb["image"], 1.0, atol=1e-6)
    with pytest.raises(UserError, match="3-channel"):
        PretrainTransform(8, 1, "rgb")({"image": img}, rng)


def elements(n):
    return [{"x": np.full((2,), i, np.float32)} for i in range(n)]


def rows(batch):
    return [int(v) for v in batch["x"][:, 0]]


def test_order_is_deterministic_and_epochs_reshuffle():
    a = pl.train_dataset(elements(10), None, seed=3, global_batch=5)
    b = pl.train_dataset(elements(10), None, seed=3, global_batch=5)
    c = pl.train_dataset(elements(10), None, seed=4, global_batch=5)
    first = [rows(a[i]) for i in range(4)]
    assert first == [rows(b[i]) for i in range(4)]
    assert first != [rows(c[i]) for i in range(4)]
    assert sorted(first[0] + first[1]) == list(range(10))  # an epoch is a permutation
    assert sorted(first[2] + first[3]) == list(range(10)) and first[:2] != first[2:]


def test_processes_read_contiguous_blocks_of_the_same_global_batch():
    one = pl.train_dataset(elements(12), None, seed=0, global_batch=6)
    p0 = pl.train_dataset(elements(12), None, seed=0, global_batch=6, process_index=0, process_count=2)
    p1 = pl.train_dataset(elements(12), None, seed=0, global_batch=6, process_index=1, process_count=2)
    for step in range(5):
        assert rows(p0[step]) + rows(p1[step]) == rows(one[step])
    with pytest.raises(UserError, match="not divisible"):
        pl.train_dataset(elements(12), None, seed=0, global_batch=5, process_count=2)


def test_random_transform_is_per_element_and_reproducible():
    def noisy(el, rng):
        return {"x": el["x"] + rng.random()}
    a = pl.train_dataset(elements(8), noisy, seed=1, global_batch=4)
    b = pl.train_dataset(elements(8), noisy, seed=1, global_batch=4, process_index=1, process_count=2)
    np.testing.assert_array_equal(a[0]["x"][2:], b[0]["x"])  # same randomness whatever the sharding


def test_iterator_state_restores_the_exact_position():
    ds = pl.train_dataset(elements(10), None, seed=0, global_batch=2)
    it = pl.train_iterator(ds, num_threads=1, prefetch=2)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [rows(next(it)) for _ in range(4)]
    it2 = pl.train_iterator(ds, num_threads=1, prefetch=2)
    it2.set_state(state)
    assert [rows(next(it2)) for _ in range(4)] == expected


def test_resolve_path(tmp_path, monkeypatch):
    assert pl.resolve_path("../shared/data") == (pl.REPO_ROOT.parent / "shared" / "data").resolve() \
        or pl.resolve_path("../shared/data").is_dir()
    monkeypatch.setenv("DMFUSE_SHARED", str(tmp_path))
    (tmp_path / "x").mkdir()
    assert pl.resolve_path("../shared/x") == tmp_path / "x"
    with pytest.raises(UserError, match="not found"):
        pl.resolve_path("no/such/dir", "data.root")


@pytest.fixture
def pair_dirs(tmp_path):
    ir, vi = tmp_path / "ir", tmp_path / "vi"
    for i, (h, w) in enumerate([(40, 50), (36, 36), (30, 44)]):
        write_png(ir / f"p{i}.png", h, w, seed=i)
        write_png(vi / f"p{i}.jpg", h, w, rgb=True, seed=10 + i)
    return ir, vi


def test_patch_index_and_same_window_for_both_modalities(pair_dirs):
    train, held = fp.split_pairs(*pair_dirs, num_holdout=1)
    assert [n for n, _, _ in train] == ["p0", "p1"] and [n for n, _, _ in held] == ["p2"]
    src = fp.PairedPatchSource(train, patch=16, step=12)
    # p0: 40x50 -> y in {0, 12, 24}, x in {0, 12, 24} = 9; p1: 36x36 -> y, x in {0, 12} = 4
    assert len(src) == 13 and "13 patches" in src.summary()
    pair, y, x = src.index[4]
    el = src[4]
    assert el["ir"].shape == (16, 16, 1) and el["vi"].shape == (16, 16, 1)
    ir_full = np.asarray(Image.open(train[pair][1]), np.float32) / 255.0
    np.testing.assert_allclose(el["ir"][..., 0], ir_full[y:y + 16, x:x + 16] * 2 - 1, atol=1e-6)
    vi_full = np.asarray(Image.open(train[pair][2]), np.float32) / 255.0 @ np.asarray(LUMA, np.float32)
    np.testing.assert_allclose(el["vi"][..., 0], vi_full[y:y + 16, x:x + 16] * 2 - 1, atol=1e-5)
    prev = fp.preview_pairs(held, size=64, multiple=4)
    assert prev["ir"].shape == (1, 28, 28, 1) and prev["names"] == ["p2"]


def test_pair_errors_list_every_problem(pair_dirs, tmp_path):
    ir, vi = pair_dirs
    write_png(ir / "lonely.png", 40, 40)
    with pytest.raises(UserError, match="only in infrared folder.*lonely"):
        fp.split_pairs(ir, vi)
    (ir / "lonely.png").unlink()
    write_png(vi / "p1.jpg", 20, 36, rgb=True)
    write_png(vi / "p2.jpg", 30, 45, rgb=True)
    train, _ = fp.split_pairs(ir, vi)
    with pytest.raises(UserError, match=r"2 pair\(s\)[\s\S]*p1[\s\S]*p2"):
        fp.PairedPatchSource(train, patch=16)
    write_png(vi / "p1.jpg", 36, 36, rgb=True)
    write_png(vi / "p2.jpg", 30, 44, rgb=True)
    with pytest.raises(UserError, match="smaller than the 64x64 patch"):
        fp.PairedPatchSource(train, patch=64)


def test_real_roadscene_patches(shared_dir):
    train, held = fp.split_pairs(shared_dir / "data/roadscene/ir", shared_dir / "data/roadscene/vi",
                                 num_holdout=2, max_pairs=2)
    src = fp.PairedPatchSource(train, patch=256, step=12)
    el = src[len(src) - 1]
    assert len(src) > 100 and el["ir"].shape == (256, 256, 1)
    assert -1.0 <= el["vi"].min() < el["vi"].max() <= 1.0
    assert {n for n, _, _ in held}.isdisjoint(n for n, _, _ in train)


def test_chroma_offsets_rebuild_the_visible_colours(pair_dirs, tmp_path):
    """PairedPatchSource(chroma=True): vi + vi_chroma is the visible image's RGB in model range, the
    offsets have zero luma, and a grey visible image has none."""
    ir, vi = pair_dirs
    write_png(vi / "p0.jpg", 40, 50, seed=3)  # grey; p1 and p2 stay colour
    train, _ = fp.split_pairs(ir, vi)
    src = fp.PairedPatchSource(train, patch=16, step=12, chroma=True)
    names = [n for n, _, _ in train]
    for i in range(len(src)):
        pair, y, x = src.index[i]
        el = src[i]
        assert set(el) == {"ir", "vi", "vi_chroma"} and el["vi_chroma"].shape == (16, 16, 3)
        np.testing.assert_allclose(el["vi_chroma"] @ np.asarray(LUMA, np.float32), 0, atol=1e-5)
        if names[pair] == "p0":
            np.testing.assert_array_equal(el["vi_chroma"], 0)
    i = next(i for i in range(len(src)) if names[src.index[i][0]] == "p1")
    _, y, x = src.index[i]
    got = src[i]["vi"] + src[i]["vi_chroma"]
    want = np.asarray(Image.open(vi / "p1.jpg"), np.float32)[y:y + 16, x:x + 16] / 255.0 * 2 - 1
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert "vi_chroma" not in fp.PairedPatchSource(train, patch=16, step=12)[0]
