"""An update shape as results.json holds it (analysis/weight_update.py writes it): the energy its best rank-r
approximations keep, and its table per module type. No torch: the report and its figures read it too."""

from __future__ import annotations

import itertools
import math
from statistics import mean, median
from typing import Any

from tabulate import tabulate


def energy_kept(singular_values: list[float]) -> list[float | None]:
    """For r = 1, 2, ...: the share of the update's energy (the sum of its squared singular values) that its best
    rank-r approximation keeps, the top r squared singular values over all of them (Eckart-Young); None for no
    update."""
    energies = [s * s for s in singular_values]
    total = math.fsum(energies)
    return [kept / total if total else None for kept in itertools.accumulate(energies)]


def by_module_type(shape: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for matrix in shape["matrices"].values():
        kinds.setdefault(matrix["type"], []).append(matrix)
    return kinds


def update_shape_text(shape: dict[str, Any], who: str | None = None, ranks: list[int] = ()) -> str:
    """Per module type: matrices, median 90%-energy rank (and of the largest rank possible), intruder dimensions per
    matrix (mean, and the most in one matrix); with `ranks`, the median share of energy the best rank-r
    approximation keeps at each."""
    share = f"{shape['energy_share']:.0%}"
    headers = [*(["run"] if who else []), "module", "matrices", f"median {share}-energy rank (of max)"]
    headers += [f"median energy at rank {r}" for r in ranks]
    headers += [f"intruder dims per matrix (top {shape['intruder_top_k']}, mean / max)"]
    rows = []
    for kind, matrices in by_module_type(shape).items():
        ranks_90 = median(m["energy_rank_90"] for m in matrices)
        kept = [energy_kept(m["singular_values"]) for m in matrices]
        kept_at = [median(k[min(r, len(k)) - 1] or 0 for k in kept) for r in ranks]
        intruders = [m["intruder_dimensions"] for m in matrices]
        row = [*([who] if who else []), kind, len(matrices), f"{ranks_90:g} (of {min(matrices[0]['shape'])})"]
        row += [f"{k:.1%}" for k in kept_at]
        row += [f"{mean(intruders):.2f} / {max(intruders)}"]
        rows.append(row)
    return tabulate(rows, headers=headers, tablefmt="github")
