from tools import bench


def test_sections_merge_into_the_existing_file(tmp_path, monkeypatch):
    calls = {"a": 0, "b": 0, "c": 0}

    def section(name):
        def fn():
            calls[name] += 1
            return f"body {name} {calls[name]}"
        return fn

    monkeypatch.setattr(bench, "SECTIONS", {"a": ("Alpha", section("a")), "b": ("Beta", section("b"))})
    monkeypatch.setattr(bench, "EXTRA_SECTIONS", {"c": ("Gamma", section("c"))})
    monkeypatch.setattr(bench, "machine", lambda: "test machine")
    out = tmp_path / "B.md"
    assert bench.main(["--out", str(out)]) == 0                 # the default: every section but extras
    text = out.read_text()
    assert "body a 1" in text and "body b 1" in text and "Gamma" not in text
    assert "_Measured by `make bench`" in text and "test machine" in text
    assert bench.main(["--out", str(out), "--sections", "b", "c"]) == 0
    text = out.read_text()
    assert "body a 1" in text and "body b 2" in text and "body c 1" in text      # Alpha kept as it was
    assert text.index("## Alpha") < text.index("## Beta") < text.index("## Gamma")
    assert "`python -m tools.bench --sections b c`" in text


def test_readme_model_table_is_synced_from_the_benchmark(tmp_path):
    from tools.bench_models import parse_table, sync_readme

    table = ("CPU forward\n\n| model | parameters | ms / sample |\n|---|---:|---:|\n"
             "| egnn | 816,449 | 80.0 |\n| specproj_unet | 3,384,761 | 30.5 |\n")
    readme = tmp_path / "R.md"
    readme.write_text("| name | what | parameters | CPU ms / sample |\n|---|---|---:|---:|\n"
                      "| `egnn` | graph | 1 | 73.1* |\n| `specproj_unet` | unet, a | b | 3,384,761 | 25.5 |\n"
                      "| `other` | x | 5 | 1.0 |\n")
    assert sync_readme(table, readme) == 2
    text = readme.read_text()
    assert "| `egnn` | graph | 816,449 | 80.0 |" in text
    assert "| `specproj_unet` | unet, a | b | 3,384,761 | 30.5 |" in text and "| `other` | x | 5 | 1.0 |" in text

