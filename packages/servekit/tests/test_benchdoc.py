"""Benchmarks print their figures and replace only their own section of docs/benchmarks.md."""

from __future__ import annotations

from negspace_servekit.benchdoc import HEADER, publish, record_section


def test_publish_prints_and_replaces_only_its_section(tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    record_section("a", "## A\n\nfirst", doc)
    record_section("b", "## B\n\nkept", doc)
    assert publish("a", "## A\n\nsecond", path=doc) == doc
    out = capsys.readouterr().out
    assert "## A\n\nsecond" in out and f"[bench] recorded in {doc}" in out
    text = doc.read_text()
    assert text.startswith(HEADER)
    assert "second" in text and "first" not in text and "## B\n\nkept" in text
    assert text.index("<!-- bench:a -->") < text.index("<!-- bench:b -->")  # replaced in place


def test_no_record_prints_and_leaves_the_file_alone(tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    record_section("a", "## A\n\nfirst", doc)
    before = doc.read_text()
    assert publish("a", "## A\n\nnew figures", record=False, path=doc) is None
    assert "new figures" in capsys.readouterr().out
    assert doc.read_text() == before
