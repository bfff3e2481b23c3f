"""benchmarks/quality_tno.py: the held-out quality tables' script (pair subsets, methods, tables).

Only the classical baselines run here (no model compile): the script's own logic is what is tested;
`dmfuse fuse`/`evaluate` have their own tests."""
from __future__ import annotations

import importlib.util
import os

import pytest

from conftest import DATA, ROOT


def _script():
    spec = importlib.util.spec_from_file_location("quality_tno", ROOT / "benchmarks" / "quality_tno.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pairs_subset_links_inputs_and_scores_only_those(shared_dir, tmp_path):
    q = _script()
    md = tmp_path / "quality.md"
    rc = q.main(["--datasets", "tno", "--pairs", "07,19", "--methods", "average,max", "--data", str(DATA),
                 "--out", str(tmp_path / "q"), "--workers", "1", "--markdown", str(md)])
    assert rc == 0
    d = tmp_path / "q" / "tno_pairs_07-19"
    for side in ("a", "b"):
        links = sorted(os.listdir(d / "inputs" / side))
        assert links == ["07.png", "19.png"], f"subset inputs ({side}): {links}"
        assert (d / "inputs" / side / "07.png").is_symlink()
    for method in ("average", "max"):
        assert sorted(os.listdir(d / method)) == ["07.png", "19.png"], f"fused folder of {method}"
    rows = (d / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * 2, f"metrics.csv should hold 2 pairs x 2 methods, got {len(rows) - 1} rows"
    text = md.read_text()
    assert text.startswith("### tno_pairs_07-19"), text[:80]
    assert "paper (DMFuse, TNO)" not in text, "the paper's 25-pair means must not sit beside a subset"


def test_unknown_pair_is_refused_with_its_folder(shared_dir, tmp_path, capsys):
    q = _script()
    rc = q.main(["--datasets", "tno", "--pairs", "07,99", "--methods", "average", "--data", str(DATA),
                 "--out", str(tmp_path / "q")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "tno/ir" in err and "99" in err, err


def test_unknown_method_is_refused(tmp_path):
    q = _script()
    with pytest.raises(SystemExit) as e:
        q.main(["--methods", "dmfuse,nope", "--out", str(tmp_path)])
    assert e.value.code == 2


def test_paper_column_sits_on_our_names_for_the_papers_metrics(tmp_path):
    """The paper's "MS-SSIM" 0.913 is our MS_SSIM_MEF; Wang's MS_SSIM gets no paper figure."""
    q = _script()
    d = tmp_path / "tno"
    d.mkdir()
    (d / "summary.md").write_text("| metric | a |\n| --- | ---: |\n| MS_SSIM ↑ | 0.7 |\n| MS_SSIM_MEF ↑ | 0.9 |\n"
                                  "| Qabf ↑ | 0.5 |\n\nScored with convention: vifb.\n")
    lines = q.dataset_table("tno", tmp_path).splitlines()
    assert lines[0].endswith("paper (DMFuse, TNO) |")
    assert lines[2].endswith("| - |"), f"MS_SSIM must have no paper figure: {lines[2]}"
    assert lines[3].endswith("| 0.9130 |"), f"MS_SSIM_MEF carries the paper's MS-SSIM: {lines[3]}"
    assert lines[4].endswith("| 0.5467 |"), lines[4]
    assert lines[-1].startswith("Scored with"), "the convention line is kept as is"
