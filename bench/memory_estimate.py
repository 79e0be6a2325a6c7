"""Paper Table 2's memory figures beside our estimate (appendix A.8 arithmetic), two conventions.

    python bench/memory_estimate.py        # prints both tables, writes bench/results/memory_estimate.json
"""
import json
from pathlib import Path

from fullrank.memory import PAPER_CONVENTION, format_paper_comparison, paper_comparison

if __name__ == "__main__":
    out = Path(__file__).parent / "results" / "memory_estimate.json"
    out.parent.mkdir(exist_ok=True)
    results = {
        "paper_convention": {"convention": PAPER_CONVENTION, "rows": paper_comparison()},
        "projection_counted": {"convention": {**PAPER_CONVENTION, "count_projection": True},
                               "rows": paper_comparison(count_projection=True)},
    }
    print(format_paper_comparison())
    print("\nwith the projection P counted (what the optimizer really stores):")
    print(format_paper_comparison(count_projection=True))
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {out}")
