"""The GPU benchmark section's code, run on the CPU with a tiny plan: it must produce its three tables.

The GPU is measured only on a lent machine (`python -m benchmarks.run --gpu --only gpu`); this keeps the code
that a GPU run depends on from breaking unnoticed between such runs (its first GPU run found a data bug).
"""

from __future__ import annotations

import re

import pytest

import benchmarks.gpu as gpu


@pytest.mark.slow
def test_the_gpu_section_measures_its_three_tables_on_a_tiny_plan(monkeypatch):
    monkeypatch.setattr(gpu, "DEVICE", "cpu")
    monkeypatch.setattr(gpu, "SAE_ALONE_CASES", [("highest", False), ("high", False)])  # compile: minutes on CPU
    plan = gpu.GpuPlan(model="sae-tiny-vit", layer=2, forward_batch=4, forward_repeats=1, sae_batch=64,
                       buffer_size=256, expansion=2, shard_images=96, steps=2, warmup=1, matmul_size=128,
                       sae_alone_steps=2, sae_alone_warmup=2)
    text = gpu.measured(plan)
    tables = [block for block in text.split("\n\n") if block.startswith("| ")]
    assert len(tables) == 3
    rate_column = {0: 2, 1: 3, 2: 4}  # to-layer images/s, end-to-end steps/s, SAE-alone steps/s
    for t, table in enumerate(tables):
        rows = table.splitlines()[2:]
        assert len(rows) == 2  # fp32 / bf16 forward, fp32 / bf16 end to end, the two SAE-alone cases kept
        for row in rows:
            cells = [cell.strip() for cell in row.strip("|").split("|")]
            assert "nan" not in cells, row
            rate = cells[rate_column[t]]
            assert re.fullmatch(r"[\d,]+(\.\d+)?", rate) and float(rate.replace(",", "")) > 0, row
