"""BENCHMARKS.md keeps the hand-measured sections of benchmarks/one_off.md verbatim.

`python -m benchmarks.run` rewrites BENCHMARKS.md and appends one_off.md; a number edited only in
BENCHMARKS.md would be lost at the next `make bench`, and one only in one_off.md would be missing until then.
"""

from __future__ import annotations

from tests.conftest import ROOT


def test_benchmarks_md_ends_with_one_off_md_verbatim():
    one_off = (ROOT / "benchmarks" / "one_off.md").read_text()
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    heading = one_off.splitlines()[0]
    assert heading.startswith("## ") and benchmarks.count(heading) == 1, heading
    assert benchmarks[benchmarks.index(heading):] == one_off, (
        "BENCHMARKS.md's hand-measured part differs from benchmarks/one_off.md: edit one_off.md and copy it over")
