"""data.source='tfds': `tfds.data_source` over a TFDS dataset stored as ArrayRecord, read by grain
(in the process and in worker processes), with no download: a tiny dataset is prepared here.

Its 'image' is a uint8 (H, W, 3) tensor like COCO's; it is stored as a Tensor feature because
encoding an Image feature (and COCO's builder) needs TensorFlow, which CI does not install
(tensorflow-datasets alone reads and writes ArrayRecord datasets).
"""
from __future__ import annotations

import numpy as np
import pytest

from dmfuse_jax.data import pipeline as pl
from dmfuse_jax.data.pretrain import TfdsSource
from dmfuse_jax.errors import UserError
import helpers as T

tfds = pytest.importorskip("tensorflow_datasets", reason="data.source='tfds' needs tensorflow-datasets")

NAME = "dmfuse_tiny_images"
N = 6


def image(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (20 + i, 24 + 2 * i, 3), dtype=np.uint8)


class DmfuseTinyImages(tfds.core.GeneratorBasedBuilder):
    """N RGB images of different sizes, with their index as 'image/id' (as COCO has)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="bytes"),
            "image/id": np.int64}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(N):
            yield i, {"image": image(i), "image/id": i}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    DmfuseTinyImages(data_dir=str(root), file_format="array_record").download_and_prepare()
    assert list(root.glob(f"{NAME}/1.0.0/*.array_record*")), "the dataset was not written as ArrayRecord"
    return root


def tfds_overrides(tfds_dir) -> list[str]:
    return ["data.source=tfds", f"data.tfds_name={NAME}", "data.tfds_split=train", f"data.tfds_data_dir={tfds_dir}"]


def test_pretrain_stage_reads_tfds_through_grain(tfds_dir, tmp_path):
    import cloudpickle

    from dmfuse_jax.training.train import build_stage

    config = T.tiny_config("pretrain", tfds_overrides(tfds_dir))
    source, transform = build_stage(config).train_source(tmp_path)
    assert isinstance(source, TfdsSource) and len(source) == N
    raw = tfds.data_source(NAME, split="train", data_dir=str(tfds_dir))
    for i in range(N):
        el = source[i]
        expected = image(int(raw[i]["image/id"])).astype(np.float32) / 255.0
        np.testing.assert_allclose(el["image"], expected, err_msg=f"element {i}")
        assert el["skipped"] == 0
    copy = cloudpickle.loads(cloudpickle.dumps(source))  # what a grain worker receives
    np.testing.assert_array_equal(copy[3]["image"], source[3]["image"])
    batch = pl.train_dataset(source, transform, seed=0, global_batch=4)[0]
    assert batch["image"].shape == (4, 16, 16, 1) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0


def test_unprepared_tfds_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=rf"{NAME}.*not prepared as ArrayRecord in {tmp_path}.*tfds build {NAME}"):
        TfdsSource(NAME, data_dir=str(tmp_path))


def test_two_grain_workers_read_the_tfds_source(tfds_dir, tmp_path):
    from dmfuse_jax.training.train import build_stage

    config = T.tiny_config("pretrain", tfds_overrides(tfds_dir))
    source, transform = build_stage(config).train_source(tmp_path)
    ds = pl.train_dataset(source, transform, seed=0, global_batch=2)
    it = pl.train_iterator(ds, num_threads=1, prefetch=2, worker_count=2)
    for step in range(4):
        got = next(it)
        np.testing.assert_array_equal(got["image"], ds[step]["image"], err_msg=f"batch {step}")


@pytest.mark.slow
def test_train_command_with_tfds_and_two_workers(tfds_dir, tmp_path):
    work = tmp_path / "tfds_run"
    extra = tfds_overrides(tfds_dir) + ["data.worker_count=2", "total_steps=2", "checkpoint_every_steps=2"]
    proc = T.start_training("pretrain", work, extra, env=T.subprocess_env(tmp_path / "xla_cache"))
    try:
        rc = proc.wait(600)
    finally:
        proc.kill()
    log = T.read_log(work)
    assert rc == 0, log[-3000:]
    assert f"data: TfdsSource('{NAME}', {N} images)" in log and "done: 2 steps" in log, log[-3000:]
