def test_readme_model_table_agrees_with_benchmarks_md():
    """The README's parameters and CPU times are those of BENCHMARKS.md's models section."""
    from pathlib import Path

    from tools.bench import _split_sections
    from tools.bench_models import _README_ROW, parse_table

    root = Path(__file__).resolve().parents[2]
    bench = parse_table(_split_sections((root / "BENCHMARKS.md").read_text())["Models (CPU forward time)"])
    readme = {}
    for line in (root / "README.md").read_text().splitlines():
        m = _README_ROW.match(line)
        if m:
            readme[m.group(1)] = (m.group(3), m.group(4))
    assert readme and set(readme) <= set(bench)
    for name, row in readme.items():
        assert row == bench[name], name
