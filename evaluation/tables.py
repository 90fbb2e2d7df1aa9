"""Write evaluation results as Markdown, CSV and JSON tables with their metadata.

Rows are (method, protocol) pairs and columns are metrics named with their backend
(``AKD (dlib)``, ``FID (fid-helper)``), ordered as seed 000's Table 1 (L1, AKD, AEID, FID, PSNR,
SSIM) followed by the others. A metric that could not run stays in the tables: the Markdown cell
reads ``skipped`` with a numbered note giving the reason, the CSV cell is empty and the reason is in
the ``skipped`` column, and the JSON keeps ``skipped: {column: reason}``.
"""
import csv
import datetime
import io
import json
import math
import os
from collections import OrderedDict

from atomic_files import write_atomically
from evaluation.protocols import COLUMNS


def _rows(results, method):
    """Normalize ``results`` to ``[(method, ProtocolResult)]``."""
    if isinstance(results, dict):
        return [(name, r) for name, items in results.items() for r in items]
    return [(method, r) for r in results]


def _all_columns(rows):
    seen = OrderedDict()
    for _, result in rows:
        for column in list(result.columns) + list(result.skipped):
            seen[column] = None
    rank = {title: i for i, (title, _) in enumerate(COLUMNS.values())}
    return sorted(seen, key=lambda c: (rank.get(c.split(" (")[0], len(rank)), c))


def format_value(value, digits=4):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _metadata(metadata):
    meta = OrderedDict(created=datetime.datetime.now().isoformat(timespec="seconds"))
    meta.update(metadata or {})
    return meta


def markdown_table(results, method="model", metadata=None, title="Evaluation"):
    rows = _rows(results, method)
    lines = [f"# {title}", ""]
    for key, value in _metadata(metadata).items():
        lines.append(f"- **{key}**: {value}")
    notes = OrderedDict()
    protocols = OrderedDict((r.protocol, r.label) for _, r in rows)
    if len(protocols) > 1:
        lines += ["", "## Summary", ""] + _summary_table(rows, protocols)
    for protocol, label in protocols.items():
        lines += ["", f"## {label}", ""] + _protocol_table(rows, protocol, notes)
    if notes:
        lines += ["", "Skipped metrics:", ""]
        lines += [f"{number}. {reason}" for reason, number in notes.items()]
    return "\n".join(lines) + "\n"


SHORT_PROTOCOL = {"reconstruction": "Same-ID", "pairs": "Pairs", "cross": "Cross-ID"}


def _summary_table(rows, protocols):
    """One row per method, protocols side by side (as seed 001's Table 1); values only."""
    groups = [(p, _all_columns([(m, r) for m, r in rows if r.protocol == p])) for p in protocols]
    header = ["method"] + [f"{SHORT_PROTOCOL.get(p, p)}: {c}" for p, columns in groups
                           for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in OrderedDict((m, None) for m, _ in rows):
        by_protocol = {r.protocol: r for m, r in rows if m == method}
        cells = [str(method)]
        for protocol, columns in groups:
            result = by_protocol.get(protocol)
            for column in columns:
                if result is None:
                    cells.append("")
                elif column in result.columns:
                    cells.append(format_value(result.columns[column]))
                else:
                    cells.append("skipped" if column in result.skipped else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _protocol_table(rows, protocol, notes):
    selected = [(m, r) for m, r in rows if r.protocol == protocol]
    columns = _all_columns(selected)
    arrows = {}
    for _, result in selected:
        arrows.update(result.higher_is_better)
    header = ["method"] + [f"{c} {'↑' if arrows.get(c) else '↓'}" for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, result in selected:
        cells = [str(method)]
        for column in columns:
            if column in result.columns:
                cells.append(format_value(result.columns[column]))
            elif column in result.skipped:
                number = notes.setdefault(result.skipped[column], len(notes) + 1)
                cells.append(f"skipped [{number}]")
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    details = [f"{k}: {format_value(v)}" for _, r in selected for k, v in r.details.items()]
    return lines + (["", "Details: " + "; ".join(details)] if details else [])


def csv_text(results, method="model", metadata=None):
    rows = _rows(results, method)
    columns = _all_columns(rows)
    meta = _metadata(metadata)
    header = ["method", "protocol"] + columns + ["skipped"] + list(meta)
    handle = io.StringIO(newline="")
    writer = csv.writer(handle)
    writer.writerow(header)
    for method_name, result in rows:
        values = [_csv_value(result.columns.get(c)) for c in columns]
        skipped = "; ".join(f"{c}: {reason}" for c, reason in result.skipped.items())
        writer.writerow([method_name, result.protocol] + values + [skipped]
                        + [str(v) for v in meta.values()])
    return handle.getvalue()


def _csv_value(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(float(value)) if isinstance(value, float) else value


def to_json(results, method="model", metadata=None):
    rows = _rows(results, method)
    return OrderedDict(metadata=_metadata(metadata), results=[OrderedDict(
        method=method_name, protocol=r.protocol, label=r.label,
        metrics=OrderedDict((c, _json_value(v)) for c, v in r.columns.items()),
        skipped=OrderedDict(r.skipped),
        details=OrderedDict((k, _json_value(v)) for k, v in r.details.items()),
        higher_is_better=r.higher_is_better) for method_name, r in rows])


def write_tables(results, out_dir, metadata=None, method="model", stem="metrics"):
    """Write ``<stem>.md``, ``<stem>.csv`` and ``<stem>.json`` in ``out_dir``; returns their paths.

    ``results``: a list of ``ProtocolResult`` for one ``method``, or ``{method: [results]}``.
    ``metadata``: e.g. ``{"config": ..., "checkpoint": ..., "protocols": ..., "dataset": ...}``.
    """
    os.makedirs(out_dir, exist_ok=True)
    metadata = _metadata(metadata)
    paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("md", "csv", "json")}
    texts = {"md": markdown_table(results, method, metadata),
             "csv": csv_text(results, method, metadata),
             "json": json.dumps(to_json(results, method, metadata), indent=2, allow_nan=False)}
    for ext, path in paths.items():  # each complete or not there (atomic_files.py)
        write_atomically(path, lambda handle, text=texts[ext]: handle.write(text.encode("utf-8")),
                         what="table")
    return paths
