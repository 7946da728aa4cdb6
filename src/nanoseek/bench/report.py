"""Benchmark results laid out for people: the machine once, what every result shares once, then a
table of what differs (`nanoseek bench ...` without `--json`).

    >>> rows = [{"bench": "train", "impl": "nanoseek", "tokens_per_s": 41234.5, "cpu": "EPYC", "threads": 2},
    ...         {"bench": "train", "impl": "reference", "tokens_per_s": 39876.1, "cpu": "EPYC", "threads": 2}]
    >>> print(results_table(rows))
    machine: cpu EPYC, threads 2
    bench: train
    <BLANKLINE>
    impl       tokens_per_s
    nanoseek   41,234
    reference  39,876
"""

from __future__ import annotations

MACHINE_KEYS = ("cpu", "threads", "torch", "python", "device", "gpu", "matmul_peak_gflops", "copy_bandwidth_gbs")


def cell(value) -> str:
    """A number with its precision for reading: 41234.5 -> '41,234', 0.01234 -> '0.0123'."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value).lower()
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def machine_of(results: list[dict]) -> dict:
    """The machine fields of the results (flat, or under "machine"), first value of each."""
    found: dict = {}
    for r in results:
        for source in (r, r.get("machine") or {}):
            for key in MACHINE_KEYS:
                if key in source and key not in found:
                    found[key] = source[key]
    return found


def _columns(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and k != "machine" and k not in MACHINE_KEYS]
    return [k for k in keys if all(not isinstance(r.get(k), (list, dict)) for r in rows)]


def results_table(results: list[dict]) -> str:
    """The machine line, the shared settings, one table per kind of row (the results of each `bench`
    value, then the ratios)."""
    if not results:
        return "no results"
    machine = machine_of(results)
    lines = ["machine: " + ", ".join(f"{k} {v}" for k, v in machine.items())] if machine else []
    measured = [r for r in results if r.get("impl") != "ratio"]
    kinds = list(dict.fromkeys(r.get("bench") for r in measured))  # a bench's other measurements: own tables
    groups = [[r for r in measured if r.get("bench") == k] for k in kinds]
    groups.append([r for r in results if r.get("impl") == "ratio"])
    main = measured or groups[-1]  # what every result shares, read from the results (not the ratios)
    shared = [
        k for k in _columns(main)
        if k != "impl" and len({repr(r.get(k)) for r in main}) == 1 and main[0].get(k) is not None
        and all(r.get(k, main[0][k]) == main[0][k] for r in results)
    ]  # fmt: skip
    if shared:
        lines.append(", ".join(f"{k}: {cell(results[0].get(k))}" for k in shared))
    for rows in (g for g in groups if g):
        varying = [k for k in _columns(rows) if k not in shared and any(r.get(k) is not None for r in rows)]
        table = [tuple(varying)] + [tuple(cell(r.get(k)) for k in varying) for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(varying))]
        lines.append("")
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)
