"""Per-epoch history: files beside the checkpoint and the one-line summary of an epoch."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"


def write_history(history: list[dict], folder: str | Path) -> list[Path]:
    """Writes ``history.json`` (a list of records; NaN as ``NaN``) and ``history.csv`` (one row per epoch,
    columns in order of first appearance) into ``folder``; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / HISTORY_JSON, folder / HISTORY_CSV
    json_path.write_text(json.dumps(history, indent=1))
    columns = list(dict.fromkeys(key for record in history for key in record))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    return [json_path, csv_path]


def read_history(folder: str | Path) -> list[dict]:
    """The records of ``history.json`` in ``folder``."""
    return json.loads((Path(folder) / HISTORY_JSON).read_text())


def _pct(value: float) -> str:
    return "nan" if math.isnan(value) else f"{100 * value:.2f}%"


def format_epoch(record: dict, epochs: int) -> str:
    """``epoch 3/30  train_loss 0.1234  train_acc 96.12%  test_acc 97.01%  train 41.2s  test 1.3s  1456 img/s``."""
    parts = [f"epoch {record['epoch']}/{epochs}", f"train_loss {record['train/loss']:.4f}"]
    parts.append(f"train_acc {_pct(record['train/acc'])}")
    for split in ("val", "test"):
        if f"{split}/acc" in record:
            parts.append(f"{split}_acc {_pct(record[f'{split}/acc'])}")
    parts.append(f"train {record['time/train_epoch_s']:.1f}s")
    for split in ("val", "test"):
        if f"time/{split}_epoch_s" in record:
            parts.append(f"{split} {record[f'time/{split}_epoch_s']:.1f}s")
    parts.append(f"{record['throughput/train_img_s']:.0f} img/s")
    return "  ".join(parts)
