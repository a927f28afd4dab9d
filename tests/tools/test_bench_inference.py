import re

import pytest

from tools import bench, bench_inference


@pytest.mark.slow   # about 15-20 s: two fresh processes import torch
def test_inference_bench_quick_reports_throughput_memory_and_projection(tmp_path):
    assert bench.SECTIONS["inference"][0].startswith("Inference")
    text = bench_inference.run(quick=True)
    rates = dict(re.findall(r"^\| (first pass|flip TTA|writing submission\.csv)[^|]*\| ([\d.]+) \|", text, re.M))
    assert set(rates) == {"first pass", "flip TTA", "writing submission.csv"}
    assert all(float(v) > 0 for v in rates.values())
    assert re.search(r"first submission on Kaggle's 65,818 test files .* about \d+\.\d\d h", text)
    mem = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| [\d.]+ \|$", text, re.M)
    assert [int(m[0]) for m in mem] == [8, 24] and all(int(m[1]) >= int(m[2]) > 0 for m in mem)
    assert "Peak at 24 files minus peak at 8 files" in text


def test_test_folder_links_to_a_few_distinct_files(tmp_path):
    root = bench_inference.make_test_folder(tmp_path, 12, distinct=3)
    files = sorted((root / "test").glob("*.npy"))
    assert len(files) == 12 and sum(not f.is_symlink() for f in files) == 3
    from fwi_core.data import load_test_sample
    assert load_test_sample(files[-1]).shape == (5, 1000, 70)
