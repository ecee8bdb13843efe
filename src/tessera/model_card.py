"""MODEL_CARD.md for an exported model: its data, the recipe commands, training steps and metrics."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text, read_header
from .export import folder_megabytes
from .train.recipe import Recipe

CARD_FILE = "MODEL_CARD.md"
MAX_LISTED_ROWS = 8


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value, "rows.0.c": value} for the scalars in nested dicts and in short lists of dicts
    (a sweep's rows; per-image lists stay whole, and the card leaves them out)."""
    if isinstance(data, list) and 0 < len(data) <= MAX_LISTED_ROWS and all(isinstance(item, dict) for item in data):
        data = dict(enumerate(data))
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def training_rows(recipe_path: Path) -> list[str]:
    """Markdown lines describing one recipe's run: the command, model kind, steps and final loss."""
    recipe = Recipe.from_file(recipe_path)
    lines = [f"- `tessera train --config {recipe_path.as_posix()}` ({recipe.model.kind}, data `{recipe.data.shards}`)"]
    metrics_file = Path(recipe.out) / "metrics.json"
    if metrics_file.is_file():
        m = json.loads(metrics_file.read_text())
        stopped = f", stopped by {m['stopped_by']} (time box)" if m.get("stopped_by") else ""
        lines.append(f"  - {m.get('step', '?')} of {recipe.train.steps} steps, batch {recipe.train.batch_size}, "
                     f"final loss {_fmt(m.get('loss', float('nan')))}{stopped}")
    return lines


def write_model_card(folder: str | Path, title: str, data: str, recipes: list[Path],
                     metrics_files: list[Path], notes: str = "") -> Path:
    """Write `folder/MODEL_CARD.md` from the exported checkpoint, its recipes and metric reports."""
    folder = Path(folder)
    header = read_header(folder)
    lines = [f"# {title}", "", f"- kind: `{header['kind']}`; files: {folder_megabytes(folder):.1f} MB "
             f"({header.get('export', {}).get('dtype', 'float32')} weights)", "", "## Data", "", data, "",
             "## Recipe (in order)", ""]
    for recipe in recipes:
        lines += training_rows(Path(recipe))
    lines += ["", "## Metrics", ""]
    for path in metrics_files:
        lines.append(f"From `{Path(path).name}`:")
        lines.append("")
        lines += [f"- {key}: {_fmt(value)}" for key, value in _flat(json.loads(Path(path).read_text())).items()
                  if not isinstance(value, (list, dict))]
        lines.append("")
    if not metrics_files:
        lines.append("(none measured)")
    if notes:
        lines += ["", "## Notes", "", notes]
    path = folder / CARD_FILE
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
