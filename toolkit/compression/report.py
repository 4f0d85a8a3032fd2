"""The before/after report: `report.md` (a table with the measuring conditions), `report.csv` (the same
rows, raw numbers) and `report.png` (quality against CPU latency, one point per model)."""

from __future__ import annotations

import csv
from pathlib import Path

from toolkit.compression.measure import Row

QUALITY_KEYS = {  # metric key: (header, format); the first present is the plot's y axis
    "accuracy": ("test accuracy", "{:.4f}"),
    "macro_f1": ("test macro-F1", "{:.4f}"),
    "mcc": ("test MCC", "{:.4f}"),
    "pearson": ("test Pearson", "{:.4f}"),
    "mlm_accuracy": ("val. MLM accuracy", "{:.4f}"),
    "mlm_loss": ("val. MLM loss", "{:.4f}"),
    "agreement": ("agreement with original", "{:.4f}"),
    "output_cosine": ("output cosine to original", "{:.4f}"),
}


def flat(row: Row, reference: Row) -> dict:
    """A row as named numbers, with the ratios to the reference (the original model)."""
    out = {
        "model": row.name,
        "params": row.params,
        "nonzero_params": row.nonzero_params,
        "sparsity": 1 - row.nonzero_params / max(row.params, 1),
        "size_mb": row.size_bytes / 1e6,
        "size_ratio": reference.size_bytes / max(row.size_bytes, 1),
        "latency_ms": row.latency_ms,
        "speedup": reference.latency_ms / max(row.latency_ms, 1e-9),
    }
    out.update({k: row.metrics.get(k) for k in QUALITY_KEYS if any(k in r for r in (row.metrics, reference.metrics))})
    out["folder"] = row.folder or ""
    out["note"] = row.note
    return out


HEADERS = {
    "model": ("model", "{}"),
    "params": ("params", "{:,}"),
    "nonzero_params": ("non-zero params", "{:,}"),
    "sparsity": ("sparsity", "{:.1%}"),
    "size_mb": ("size MB", "{:.2f}"),
    "size_ratio": ("smaller x", "{:.2f}"),
    "latency_ms": ("latency ms", "{:.1f}"),
    "speedup": ("faster x", "{:.2f}"),
    **QUALITY_KEYS,
}


def markdown_table(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k in HEADERS]
    lines = [
        "| " + " | ".join(HEADERS[k][0] for k in keys) + " |",
        "| " + " | ".join("---" if k == "model" else "---:" for k in keys) + " |",
    ]
    for row in rows:
        cells = [HEADERS[k][1].format(row[k]) if row.get(k) is not None else "-" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(out: Path, title: str, conditions: str, rows: list[Row]) -> tuple[str, Path, Path, Path | None]:
    """Write report.md, report.csv and report.png into `out`; returns (table, md, csv, png)."""
    table_rows = [flat(r, rows[0]) for r in rows]
    table = markdown_table(table_rows)
    notes = [f"- **{r.name}**: {r.note}" for r in rows if r.note]
    md = out / "report.md"
    md.write_text(f"# {title}\n\n{conditions}\n\n{table}\n\n" + "\n".join(notes) + "\n")
    csv_path = out / "report.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table_rows[0]))
        writer.writeheader()
        writer.writerows(table_rows)
    return table, md, csv_path, plot(table_rows, out / "report.png")


def plot(rows: list[dict], path: Path) -> Path | None:
    """Quality against CPU latency, one labelled point per model."""
    key = next((k for k in QUALITY_KEYS if rows[0].get(k) is not None), None)
    if key is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if row.get(key) is None:
            continue
        ax.scatter(row["latency_ms"], row[key], s=40)
        ax.annotate(row["model"], (row["latency_ms"], row[key]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("CPU latency per batch (ms, median)")
    ax.set_ylabel(QUALITY_KEYS[key][0])
    ax.set_title("Compression: quality against latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
