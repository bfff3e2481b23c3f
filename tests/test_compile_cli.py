"""`dmfuse compile`: the real train step compiled for a 4-chip TPU v5e slice through libtpu (no TPU
here), data parallel and fsdp 2; the report's fields; a batch that cannot fit exits 2 with one line;
the fuse function and both training steps lowered for CUDA with the Triton kernel and cuDNN attention.

The TPU cases need libtpu (`pip install 'dmfuse-jax[tpu]'`, which CI installs) and skip without it.
They compile a cut-down quickstart UNet (2 levels, 1 res block, 16x16 crops, bf16): the same Trainer
and stage as `dmfuse train`, small enough that XLA:TPU takes seconds rather than minutes.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dmfuse_jax import accelerators
from tests.helpers import REPO_ROOT, subprocess_env

needs_libtpu = pytest.mark.skipif(accelerators.libtpu_version() is None,
                                  reason="libtpu not installed (pip install 'dmfuse-jax[tpu]')")

PRETRAIN = "configs/quickstart_pretrain.py"
# the quickstart UNet cut to 2 levels of 1 res block (attention at 8x8), 16x16 crops, bf16
SMALL = ["--config.model.dtype=bfloat16", "--config.model.unet.channel_mults=(1,2)",
         "--config.model.unet.res_blocks=1", "--config.model.unet.attn_res=(8,)",
         "--config.model.unet.image_size=16"]


def dmfuse_compile(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dmfuse_jax.cli", "compile", *args], cwd=REPO_ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=900)


@needs_libtpu
def test_tpu_data_parallel_step_report(tmp_path):
    out = tmp_path / "report.json"
    p = dmfuse_compile("--config", PRETRAIN, "--topology", "v5e:2x2", "--config.batch_size=8", *SMALL,
                       "--json", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["chips"] == 4 and r["mesh"] == {"data": 4, "fsdp": 1} and r["per_chip_batch"] == 2
    assert r["chip"]["name"] == "TPU v5e" and r["chip"]["hbm_bytes"] == 16 * 2 ** 30
    # data parallel: the gradients are all-reduced, nothing is gathered
    assert r["collectives"].get("all-reduce", {}).get("count", 0) >= 1, r["collectives"]
    assert "all-gather" not in r["collectives"] and "reduce-scatter" not in r["collectives"]
    m = r["memory"]
    # replicated state: params + Adam (2 moments) + EMA, float32, donated in place
    assert m["argument_bytes"] > 0 and m["alias_bytes"] > 0.9 * m["output_bytes"]
    assert 0 < m["peak_bytes"] < 2 ** 30
    assert m["peak_bytes"] == m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] + m["temp_bytes"] + m["code_bytes"]
    f = r["flops"]
    assert f["analytic_per_chip"] == pytest.approx(f["analytic_per_step"] / 4)
    # XLA counts elementwise work too; convolutions and matmuls are most of it
    assert 0.8 * f["analytic_per_chip"] < f["xla_per_chip"] < 5 * f["analytic_per_chip"]
    rf = r["roofline"]
    assert rf["step_s"] == pytest.approx(max(rf["compute_s"], rf["memory_s"]))
    assert rf["compute_s"] == pytest.approx(f["analytic_per_chip"] / 197e12)
    assert rf["images_per_s"] == pytest.approx(8 / rf["step_s"]) and 0 < rf["best_mfu"] <= 1
    # the roofline's traffic: kernel inputs + outputs, below XLA's count (which adds fused instructions)
    assert m["argument_bytes"] < r["kernel_io_bytes"] < r["bytes_accessed"]
    assert rf["memory_s"] == pytest.approx(r["kernel_io_bytes"] / 819e9)
    assert r["compile"]["wall_s"] > 0 and r["compile"]["stage"] == "compiled by XLA:TPU"
    text = p.stdout
    for needle in ("memory per chip", "FLOPs per chip", "bytes accessed", "all-reduce", "roofline bound",
                   "compiled by XLA:TPU in"):
        assert needle in text, text


@needs_libtpu
def test_tpu_fsdp_gathers_params():
    p = dmfuse_compile("--config", PRETRAIN, "--topology", "v5e:2x2", "--config.batch_size=8",
                       "--config.sharding.mesh_shape=(-1, 2)", "--config.sharding.fsdp_min_size=1024", *SMALL)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "mesh {'data': 2, 'fsdp': 2}" in p.stdout
    coll = p.stdout.split("collectives per chip:")[1].splitlines()[0]
    assert "all-gather" in coll or "reduce-scatter" in coll, coll


@needs_libtpu
def test_batch_that_cannot_fit_exits_2():
    p = dmfuse_compile("--config", PRETRAIN, "--topology", "v5e:2x2", "--config.batch_size=4096",
                       "--config.model.unet.image_size=256", *SMALL[:4])
    assert p.returncode == 2, p.stderr[-3000:]
    err = [l for l in p.stderr.splitlines() if l.startswith("dmfuse compile:")]
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    line = err[0]
    assert "does not fit v5e:2x2" in line and "batch 4096 (1024 per chip) of 256x256" in line
    assert "HBM" in line and "largest buffers" in line and "fsdp" in line, line


def test_a_compiled_program_past_the_chips_hbm_does_not_fit():
    """XLA:TPU's compile-only client compiled a 1088x1088 fuse with 17.55 GiB of temps for a 16 GiB v5e
    (docs/fit.md): the command's own check refuses what XLA let through; generated code is left out,
    as XLA's limit leaves it (48 per chip on v5e-8 fits with 15.69 GiB of buffers + 0.19 GiB of code)."""
    from dmfuse_jax.commands.compile import check_tpu_capacity
    from dmfuse_jax.errors import UserError

    gib = 2 ** 30
    r = dict(config_name="dmfuse_quarter", topology="v5e:2x2", what="fuse", batch=1, size=(1088, 1088),
             chip={"name": "TPU v5e", "hbm_bytes": 16 * gib},
             memory=dict(peak_bytes=int(17.84 * gib), code_bytes=int(0.17 * gib)))
    with pytest.raises(UserError, match=r"does not fit v5e:2x2: 1 pair\(s\) of 1088x1088 needs 17.67 GiB .*"
                                        r"TPU v5e has 16.00 GiB HBM; largest buffers: 1 GiB f32\[8\] \(global\)"):
        check_tpu_capacity(r, lambda: [("1 GiB", "f32[8]")])
    r["memory"] = dict(peak_bytes=int(15.88 * gib), code_bytes=int(0.19 * gib))
    check_tpu_capacity(r, lambda: [])  # fits: no error


def test_bad_topology_exits_2():
    p = dmfuse_compile("--config", PRETRAIN, "--topology", "v9x:2x2")
    assert p.returncode == 2 and "--topology v9x:2x2" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("case", ["fuse", "pretrain", "fusion"])
def test_cuda_lowering_has_triton_and_cudnn(case):
    """Lowered for CUDA in this process (no GPU; `--lower-only`, so the same with or without the CUDA
    plugin): bf16, the criss-cross Triton kernel and cuDNN attention."""
    import argparse

    from dmfuse_jax.commands.compile import build_report
    from dmfuse_jax.config_lib import load_config

    path = {"fuse": "configs/tiny.py", "pretrain": PRETRAIN, "fusion": "configs/quickstart_fusion.py"}[case]
    over = {"fuse": [], "pretrain": ["batch_size=2"] + [s.removeprefix("--config.") for s in SMALL[1:]],
            "fusion": ["batch_size=2", "data.patch_size=32"]}[case]
    config = load_config(str(REPO_ROOT / path), over)
    args = argparse.Namespace(config=path, topology="cuda", num_slices=1, what="fuse" if case == "fuse" else "train",
                              size="64x64", batch=1, json=None, lower_only=True)
    r = build_report(config, args)
    assert r["dtype"] == "bfloat16" and r["chip"]["name"] == "NVIDIA H100 SXM"
    assert r["xla_gpu_compile"] == "unavailable: --lower-only" and "memory" not in r
    calls = r["custom_calls"]
    if case != "pretrain":  # the fusion head's criss-cross attention
        assert calls.get("__gpu$xla.gpu.triton", 0) >= 1, calls
    assert any(k.startswith("__cudnn$fmha") for k in calls), calls  # the UNet's self-attention
    assert r["flops"]["analytic_per_chip"] > 0
    if case != "fuse":
        e = r["hbm_estimate"]
        assert e["estimate_bytes"] == e["state_bytes"] + e["gradient_bytes"] + e["batch_bytes"] + e["residual_bytes"]
        assert e["residual_bytes"] > 0


@needs_libtpu
def test_tpu_stage2_data_parallel_moves_nothing_but_gradients(tmp_path):
    """Stage 2 data parallel (the quickstart fusion step, 1 pair per chip of 4): the only collective is
    the gradient all-reduce. The UNet batch (both modalities at 3 timesteps) and the head's paired
    batches are image-major (`fusion_head.pair_batch`); laid out t-major or concatenated along the
    batch, XLA moved activations between chips (130 collective-permutes and an all-gather here, and
    14.2 GiB per chip for the paper-size step at 4 per chip on v5e-8; docs/fit.md)."""
    out = tmp_path / "report.json"
    p = dmfuse_compile("--config", "configs/quickstart_fusion.py", "--topology", "v5e:2x2", "--config.batch_size=4",
                       "--config.data.patch_size=32", "--config.model.dtype=bfloat16", "--json", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["stage"] == "fusion" and r["mesh"] == {"data": 4, "fsdp": 1} and r["per_chip_batch"] == 1
    assert set(r["collectives"]) == {"all-reduce"}, r["collectives"]


def test_fit_table_affine_line_and_status(tmp_path):
    """benchmarks/fit_table.py: the memory line from two measured cells, the largest batch it predicts,
    and the table's marks (measured / predicted / does not fit / not done), from JSON cells alone."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fit_table", REPO_ROOT / "benchmarks" / "fit_table.py")
    ft = importlib.util.module_from_spec(spec)
    sys.modules["fit_table"] = ft  # dataclasses look their module up while the file runs
    spec.loader.exec_module(ft)
    gib = 2 ** 30

    def cell(name, per_chip, peak):
        r = dict(config=ft.COCO, topology="v5e:2x4", num_slices=1, what="train", chips=8, mesh={"data": 8, "fsdp": 1},
                 global_batch=int(per_chip * 8), per_chip_batch=per_chip, stage="pretrain",
                 chip={"name": "TPU v5e", "hbm_bytes": 16e9},
                 memory={"peak_bytes": peak}, collectives={"all-reduce": {"count": 1, "bytes": 2 ** 20}},
                 roofline={"step_s": 0.01, "bound": "compute", "images_per_s": 6400.0},
                 compile={"wall_s": 1300.0, "cpu_s": 1700.0})
        (tmp_path / f"{name}.json").write_text(json.dumps(r))

    cell("coco_v5e8_b64", 8, 1 * gib + 8 * 0.5 * gib)  # a + k b with a = 1 GiB, k = 0.5 GiB
    cell("coco_v5e8_b32", 4, 1 * gib + 4 * 0.5 * gib)
    (tmp_path / "coco_v5e16_fsdp4.json").write_text(json.dumps(dict(
        does_not_fit="dmfuse compile: error: too big", config=ft.COCO, topology="v5e:4x4", batch=128, fsdp=4)))
    fits = ft.lines(ft.CELLS, ft.load(tmp_path))
    a, k, src = fits["v5e dp"]
    assert a == pytest.approx(gib) and k == pytest.approx(0.5 * gib) and "coco_v5e8_b64" in src
    assert ft.largest_batch(fits["v5e dp"], 16e9) == int((16e9 - gib) // (0.5 * gib))
    text = ft.table(tmp_path)
    row = lambda name: next(l for l in text.splitlines() if l.startswith(f"| {name} |"))  # noqa: E731
    predicted = int((ft._hbm(ft.CELLS[0]) - gib) // (0.5 * gib))  # the chip's HBM from dmfuse_jax.accelerators
    assert "measured 5.00" in row("coco_v5e8_b64") and f"predicted {predicted}" in row("coco_v5e8_b64")
    assert "does not fit (too big)" in row("coco_v5e16_fsdp4")
    assert "predicted" in row("coco_v5e16_fsdp1")  # same chip and mesh kind: on the line, not compiled
    assert "not done" in row("coco_v5p8")
    assert "chip-hours" in text and "11 (bound)" in row("coco_v5e8_b64")  # 500k x 10 ms x 8 chips / 3600 = 11 h


def test_fit_table_bisects_the_largest_batch(tmp_path):
    """benchmarks/fit_table.py 'largest:LINE': the bracket (largest per-chip batch that compiled,
    smallest above it that did not) from cells of any name, the next compile halfway between, the stop
    at the resolution, and the table's measured bracket instead of the line's prediction."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fit_table", REPO_ROOT / "benchmarks" / "fit_table.py")
    ft = importlib.util.module_from_spec(spec)
    sys.modules["fit_table"] = ft
    spec.loader.exec_module(ft)
    gib = 2 ** 30

    def fits(name, per_chip, peak):
        r = dict(config=ft.COCO, topology="v5e:2x4", num_slices=1, what="train", chips=8, mesh={"data": 8, "fsdp": 1},
                 global_batch=per_chip * 8, per_chip_batch=per_chip, stage="pretrain",
                 chip={"name": "TPU v5e", "hbm_bytes": 16e9}, memory={"peak_bytes": peak}, collectives={},
                 roofline={"step_s": 0.01, "bound": "memory", "images_per_s": 100.0},
                 compile={"wall_s": 600.0, "cpu_s": 600.0})
        (tmp_path / f"{name}.json").write_text(json.dumps(r))

    def fails(name, batch, topology="v5e:2x4", fsdp=1):
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(
            does_not_fit=f"dmfuse compile: error: x does not fit {topology}: batch {batch} needs 20.00G per chip (XLA), "
                         "TPU v5e has 15.75G HBM; largest buffers: ...", config=ft.COCO, topology=topology,
            batch=batch, fsdp=fsdp, num_slices=1, what="train")))

    fits("coco_v5e8_b32", 4, 4 * gib)
    fits("coco_v5e8_b64", 8, 5 * gib)
    assert ft.largest_cell("largest:v5e dp", ft.load(tmp_path), 8) is None  # nothing failed yet: no bracket
    fails("coco_v5e8_b512", 512)
    fails("coco_v5e16_fsdp4_b512", 512, topology="v5e:4x4", fsdp=4)  # another program: not in the bracket
    assert ft.bracket("v5e dp", ft.load(tmp_path))[:2] == (8, 64)
    cell = ft.largest_cell("largest:v5e dp", ft.load(tmp_path), 8)
    assert (cell.name, cell.batch, cell.topology, cell.fsdp) == ("coco_v5e8_b288", 288, "v5e:2x4", 1)  # (8 + 64) / 2 = 36
    fits("coco_v5e8_b288", 36, 9 * gib)
    fails("coco_v5e8_b400", 400)
    assert ft.bracket("v5e dp", ft.load(tmp_path))[:2] == (36, 50)
    assert ft.largest_cell("largest:v5e dp", ft.load(tmp_path), 8).batch == 43 * 8
    assert ft.largest_cell("largest:v5e dp", ft.load(tmp_path), 16) is None  # 50 - 36 <= 16: closed
    text = ft.table(tmp_path)
    row = lambda name: next(l for l in text.splitlines() if l.startswith(f"| {name} |"))  # noqa: E731
    assert "measured: fits 36, not 50" in row("coco_v5e8_b64")
    assert "coco_v5e8_b64: fits 36, not 50" in row("coco_v5e16_fsdp1")  # same chip and mesh kind, not compiled
    assert "does not fit (needs 20.00G per chip" in row("coco_v5e8_b400") and "400 (50)" in row("coco_v5e8_b400")
    assert "measured 9.00" in row("coco_v5e8_b288")
    # 'at:CELL:N' compiles that cell's own program at N per chip; a fit there joins its row
    at = ft.at_cell("at:coco_v5e16_fsdp1:36")
    assert (at.name, at.batch, at.topology, at.fsdp, at.num_slices) == ("coco_v5e16_fsdp1_b576", 576, "v5e:4x4", 1, 1)
    assert ft.at_cell("at:v6e dp:64").batch == 512 and ft.at_cell("fuse:1056").size == "1056x1056"
    r = json.loads((tmp_path / "coco_v5e8_b288.json").read_text())
    r.update(topology="v5e:4x4", chips=16, global_batch=576)
    (tmp_path / "coco_v5e16_fsdp1_b576.json").write_text(json.dumps(r))
    assert "fits 36 (own compile); coco_v5e8_b64: fits 36, not 50" in next(
        l for l in ft.table(tmp_path).splitlines() if l.startswith("| coco_v5e16_fsdp1 |"))


def test_hlo_parsing_collectives_kernel_io_and_oom():
    """The report's readings of XLA's text: collectives (async pairs once, results' bytes), the kernels'
    inputs + outputs (fusion bodies not counted), XLA:TPU's out-of-memory message."""
    from dmfuse_jax.commands.compile import collectives, kernel_io_bytes, oom_summary

    hlo = """HloModule m
%fused (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %e = f32[8]{0} exponential(f32[8]{0} %p)
}
ENTRY %main (x: bf16[4], y: f32[8]) -> f32[8] {
  %x = bf16[4]{0} parameter(0)
  %y = f32[8]{0} parameter(1)
  %ag = (bf16[4]{0}, bf16[16]{0}) all-gather-start(bf16[4]{0} %x), dimensions={0}
  %agd = bf16[16]{0} all-gather-done((bf16[4]{0}, bf16[16]{0}) %ag)
  %f = f32[8]{0} fusion(f32[8]{0} %y), kind=kLoop, calls=%fused
  %ar = f32[8]{0} all-reduce-start(f32[8]{0} %f), to_apply=%add
  ROOT %ard = f32[8]{0} all-reduce-done(f32[8]{0} %ar)
}
"""
    assert collectives(hlo) == {"all-gather": {"count": 1, "bytes": 32}, "all-reduce": {"count": 1, "bytes": 32}}
    # ag-start 8+32+8, ag-done 32+40, fusion 32+32, ar-start 32+32, ar-done 32+32 (the exp inside: not counted)
    assert kernel_io_bytes(hlo) == 48 + 72 + 64 + 64 + 64
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (55.14G) "
           "exceeds available HBM (15.75G).")
    assert oom_summary(msg) == {"used": "55.14G", "capacity": "15.75G", "largest": []}
    assert oom_summary("INVALID_ARGUMENT: something else") is None
