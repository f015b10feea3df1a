"""Fraction of the values of every weight matrix that differ between two model directories, compared
in the dtype of the second (a bf16 final/ against the float32 initial model cast to bf16).

    python -m scripts.changed_fraction models/tiny-mistral runs/<run>/final
Prints one line per tensor and the median / minimum over the 2-D tensors."""

import statistics
import sys
from pathlib import Path

from safetensors.torch import load_file


def changed_fractions(before_dir, after_dir):
    """{name: fraction of elements of after != before.to(after.dtype)} for every tensor of after_dir."""
    before = load_file(Path(before_dir) / "model.safetensors")
    after = load_file(Path(after_dir) / "model.safetensors")
    return {k: float((v != before[k].to(v.dtype)).float().mean()) for k, v in after.items()}, after


if __name__ == "__main__":
    fractions, after = changed_fractions(sys.argv[1], sys.argv[2])
    for k, f in fractions.items():
        print(f"{f:7.1%}  {tuple(after[k].shape)}  {after[k].dtype}  {k}")
    matrices = [f for k, f in fractions.items() if after[k].dim() == 2]
    print(f"2-D weight matrices: {len(matrices)}; changed fraction median {statistics.median(matrices):.1%}, "
          f"min {min(matrices):.1%}")
