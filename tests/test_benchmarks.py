"""The benchmarks docs/performance.md quotes still run on the current code.

Each benchmark runs in this process at toy sizes (a 1-layer Mistral of width 32, rows of 32 tokens): the
figures are meaningless at that size and are not checked, but every part must run to its end and print
its tables, and the properties that hold at any size are asserted. A benchmark that no longer runs
(e.g. efficiency.py's packing part after TokenizedData moved to Arrow) would otherwise be found only when
someone re-measures docs/performance.md.
"""

import re

import pytest

from benchmarks import efficiency, ift_cost

TOY = ["--hidden", "32", "--layers", "1", "--threads", "0"]


pytestmark = pytest.mark.integration


def table_rows(text, first_cell):
    """The cells of every markdown table row of `text` whose first cell is `first_cell`."""
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith(f"| {first_cell} |")]


def test_efficiency_runs_every_part_and_packing_leaves_no_padding(capsys):
    efficiency.main(TOY + ["--vocabs", "256", "--head-tokens", "64", "--batch", "2", "--seq", "32", "--reps", "1",
                           "--rows", "8", "--packing-batch", "4", "--min-len", "8", "--median-len", "24",
                           "--max-len", "48", "--chunk", "16"])
    out = capsys.readouterr().out
    assert len(table_rows(out, "256")) == 1 + 4 + 2  # head; step: 2 losses x 2 heads; IFT / SFT per head
    padded, grouped, packed = (table_rows(out, m)[0] for m in ("padded random", "length-grouped", "packed random"))
    assert float(packed[1]) == 1.0  # packed batches hold real tokens only
    assert float(padded[1]) < float(grouped[1]) <= 1.0  # grouping by length pads less than random batches


def test_ift_cost_runs_every_loss_and_a_precomputed_reference_holds_no_model(capsys):
    ift_cost.main(TOY + ["--heads", "2", "--kv-heads", "2", "--intermediate", "64", "--vocab", "256", "--seq", "32",
                         "--reps", "1", "--warmup", "2", "--losses", "sft,ift,dpo,dpo_pre,orpo", "--long-seq", "64",
                         "--rp-reps", "2"])
    out = capsys.readouterr().out
    losses = set(re.findall(r"^(sft|ift|dpo|dpo_pre|orpo)\s+\d", out, re.MULTILINE))
    assert losses == {"sft", "ift", "dpo", "dpo_pre", "orpo"}  # a row in the results table for each
    assert "relation_propagation_weights fwd+bwd" in out

    def memory_ratio(name):
        return float(re.search(rf"{re.escape(name)} peak memory\s+total ([\d.]+)", out).group(1))
    assert memory_ratio("DPO precomputed / live") < 1.0  # the reference model is not resident
    assert memory_ratio("IFT / SFT ") == pytest.approx(1.0, abs=0.1)  # the intuition pass frees its activations
