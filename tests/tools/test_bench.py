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
