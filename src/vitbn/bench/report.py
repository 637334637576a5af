"""The benchmark's table (plain text, one row per configuration), its comparisons, the JSON file, and the Markdown
page: the provenance line and the very text the terminal shows, so that a page can be rendered again from its JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from vitbn.errors import UserError

# (header, row key, format) of the table's columns; None values print as "-".
COLUMNS = (
    ("model", "model", "{}"),
    ("depth", "depth", "{}"),
    ("prec", "precision", "{}"),
    ("mode", "mode", "{}"),
    ("compile", "compiled", "{}"),
    ("batch", "batch", "{}"),
    ("img/s", "img_s", "{:.1f}"),
    ("±%", "spread_pct", "{:.0f}"),
    ("MFLOP/img", "flops_img", "{:.2f}"),
    ("GFLOP/s", "gflops", "{:.1f}"),
    ("peak", "peak_gflops", "{:.1f}"),
    ("util%", "util_pct", "{:.1f}"),
    ("MB/img", "bytes_img", "{:.2f}"),
    ("roof img/s", "roof_img_s", "{:.0f}"),
    ("roof%", "roof_pct", "{:.0f}"),
    ("bound", "bound", "{}"),
    ("s/epoch", "epoch_s", "{:.1f}"),
    ("load%", "loader_pct", "{:.2f}"),
    ("mem MiB", "mem_mb", "{:.1f}"),
    ("norm%", "norm_pct", "{:.1f}"),
    ("mm%", "matmul_pct", "{:.0f}"),
)


LEGEND = """\
img/s: median over the interleaved rounds; ±%: (max - min) / median. MFLOP/img: matrix-product FLOPs per image
(torch.utils.flop_counter; train = forward + backward). GFLOP/s = MFLOP/img x img/s / 1000. peak: dense matmul
GFLOP/s in the same precision, timed in the same rounds; util% = GFLOP/s / peak. MB/img: bytes that the matrix
products and layout changes (copies, casts, cat) read and write per image. roof img/s: the roofline bound, the
slower of the FLOPs at the peak and the bytes at the measured memory bandwidth; roof% = img/s / roof img/s; bound:
which of the two limits it. s/epoch = 60000 / img/s (the steps
of an MNIST epoch); load% = loader epoch / (loader epoch + s/epoch). mem MiB: peak tensor memory of one call above
the level before it. norm%, mm%: share of operator time in normalization / matrix products (torch.profiler,
eager cases)."""


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "compiled":
        return "yes" if value else "no"
    if key in ("flops_img", "bytes_img"):
        value = value / 1e6
    return fmt.format(value)


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table; a row that could not run shows its ``n/a (reason)`` after it."""
    cells = [[_cell(r, key, fmt) for _, key, fmt in COLUMNS] for r in rows]
    headers = [h for h, _, _ in COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    for row, line in zip(rows, cells):
        text = "  ".join(c.rjust(w) for c, w in zip(line, widths))
        lines.append(text if row["status"] == "ok" else f"{text}  {row['status']}")
    return "\n".join(lines)


def format_comparisons(comparisons: list[dict]) -> str:
    """One line per paired ratio, with its target where the issue sets one."""
    lines = []
    for c in comparisons:
        note = "" if c["target"] is None else f"  target >= {c['target']:.1f}: {'met' if c['met'] else 'NOT met'}"
        if c.get("bound") is not None:
            note += f"  (folding can buy at most {c['bound']:.3f}x: the unfolded model's norm share)"
        lines.append(f"{c['what']:<28} {c['ratio']:6.3f}x  ({c['a']}  vs  {c['b']}){note}")
    return "\n".join(lines)


def format_report(result: dict) -> str:
    """Everything ``vitbn bench`` prints: environment, peaks, the table, the comparisons, the recipe, norm and export
    sections, the loader (the terminal and the ``--markdown`` page show this same text)."""
    meta = result["meta"]
    out = [
        f"vitbn bench  {meta['date']}  commit {meta.get('commit', '?')}  {meta['device_name']}  torch {meta['torch']}  "
        f"threads {meta['threads']}",
        f"load avg (1, 5, 15 min) at start {meta['load_avg']}, at end {meta.get('load_avg_end')}  "
        f"allocator tuned: {meta['allocator_tuned']}  compile: {meta['compile']}  took {meta['seconds']:.0f} s",
        "peak (dense matmul, median): "
        + ", ".join(f"{p} {v['median']:.1f} GFLOP/s (n={v['size']})" for p, v in result["peaks"].items())
        + (
            f"; memory bandwidth (large copy, median) {meta['bandwidth_gb_s']:.1f} GB/s"
            if meta.get("bandwidth_gb_s")
            else ""
        ),
        "",
        format_table(result["rows"]),
        "",
        LEGEND,
    ]
    if result["comparisons"]:
        out += ["", "paired ratios (median over interleaved rounds):", format_comparisons(result["comparisons"])]
    if result.get("rows"):
        from vitbn.bench.targets import format_profile, format_targets, target_rows

        out += ["", format_targets(target_rows(result))]
        if result.get("profile"):
            title = f"profile of {result['profile']['case']} (top operators by self time, per step):"
            out += ["", format_profile(title, result["profile"]["ops"])]
    if result.get("recipes"):
        from vitbn.bench.recipes import format_recipes

        out += ["", format_recipes(result["recipes"])]
    if result.get("norms"):
        from vitbn.bench.norms import format_norms

        out += ["", format_norms(result["norms"])]
    loader = result.get("loader")
    if loader:
        detail = f"{loader['epoch_s']:.3f} s per epoch of {loader['images']} images" if loader["epoch_s"] else ""
        out += ["", f"loader (InMemoryLoader, MNIST train, shuffled): {detail or loader['status']}"]
        if loader.get("augmented"):
            aug = loader["augmented"]
            out.append(f"loader + {aug['level']} augmentation (Augmenter on every batch): {aug['epoch_s']:.3f} s per "
                       f"epoch of {aug['images']} images")  # fmt: skip
    if result.get("export"):
        from vitbn.bench.export import format_export

        out += ["", format_export(result["export"])]
    return "\n".join(out)


def _json_safe(value):
    """NaN and infinities (not JSON) become None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def save_json(result: dict, path: str | Path) -> Path:
    """Writes the result as JSON (creating the folder); NaN values are written as null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(result), indent=1, allow_nan=False) + "\n")
    return path


def as_saved(result: dict) -> dict:
    """The result as its JSON file holds it (NaN as None, tuples as lists): what the terminal, the page and a page
    rendered again from the file all format, so that the three show the same text."""
    return json.loads(json.dumps(_json_safe(result), allow_nan=False))


def read_saved(path: str | Path, required: tuple[str, ...], writer: str) -> dict:
    """Reads a JSON object, with a one-line error naming the file when it is missing, malformed or lacks one of
    the ``required`` keys (``writer``: what writes such a file, for the message)."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"benchmark file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"benchmark file {path} is not valid JSON: {exc}") from None
    missing = [key for key in required if not isinstance(result, dict) or key not in result]
    if missing:
        raise UserError(f"benchmark file {path} has no {', '.join(map(repr, missing))}: not written by {writer}")
    return result


def load_json(path: str | Path) -> dict:
    """Reads a result written by ``save_json``, with a one-line error for a missing or malformed file."""
    return read_saved(path, ("rows",), "vitbn bench")


def publish(saved: dict, text: str, out: str | Path | None, markdown: str | Path | None,
            page: Callable[[dict], str]) -> None:  # fmt: skip
    """Prints ``text`` (what the terminal shows), then writes the JSON (``out``, default: the page's name with
    .json when there is a page) and the ``markdown`` page ``page(saved)``, saying what it wrote."""
    print(text)
    out = out or (Path(markdown).with_suffix(".json") if markdown else None)
    if out:
        print(f"\nwrote {save_json(saved, out)}")
    if markdown:
        print(f"wrote {write_page(page(saved), markdown)}")


def markdown_page(title: str, notes: list[str], text: str) -> str:
    """A benchmark's page: the title, the lines saying what made it (one paragraph each), then ``text`` as the
    terminal shows it, in a ``text`` block."""
    return "\n\n".join([f"# {title}", *notes, f"```text\n{text}\n```"]) + "\n"


def write_page(page: str, path: str | Path) -> Path:
    """Writes a page (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


def rendered_again(path: str | Path, command: str | None = None) -> str:
    """The extra line of a page rendered again from a JSON file: from which file, by which command, at which commit
    (the page's provenance line stays the measurement's)."""
    from vitbn.provenance import command_line, source_commit

    commit, dirty = source_commit()
    changes = " with uncommitted changes" if dirty else ""
    return f"Rendered again from {Path(path).name} by `{command or command_line()}` at commit {commit[:7]}{changes}."


def provenance_line(result: dict) -> str:
    """The ``Provenance.line()`` of a result that carries its ``provenance`` record."""
    from vitbn.provenance import Provenance

    return Provenance.from_dict(result["provenance"]).line()


def render_saved(
    path: str | Path,
    out: str | Path,
    page: Callable[[dict, list[str]], str],
    keys: tuple[str, ...],
    writer: str,
    command: str | None = None,
) -> Path:
    """Writes ``page(result, [line])`` of the result saved in ``path`` to ``out``, measuring nothing: ``line`` says
    that it was rendered again, and by what. A file without the ``keys`` a page needs, or with a field missing or of
    the wrong kind, is a one-line error naming the file."""
    result = read_saved(path, keys, writer)
    try:
        text = page(result, [rendered_again(path, command)])
    except UserError as exc:
        raise UserError(f"benchmark file {path}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise UserError(f"benchmark file {path} lacks what the page shows ({type(exc).__name__}: {exc})") from None
    return write_page(text, out)


# What a page needs of a result: ``format_report``'s sections and the provenance the CLI adds.
PAGE_KEYS = ("rows", "meta", "peaks", "comparisons", "provenance")
PAGE_TITLE = "vitbn bench"


def bench_page(result: dict, notes: list[str] | None = None) -> str:
    """The ``--markdown`` page of a result that carries its ``provenance``: the provenance line, ``notes``, then
    ``format_report``'s text (what the terminal showed)."""
    return markdown_page(PAGE_TITLE, [provenance_line(result), *(notes or [])], format_report(result))


def render_page(path: str | Path, out: str | Path, command: str | None = None) -> Path:
    """``vitbn bench --render FILE.json --markdown OUT``: the page of a result saved earlier, with the measurement's
    provenance line and one saying that it was rendered again."""
    return render_saved(path, out, bench_page, PAGE_KEYS, "vitbn bench --out or --markdown", command)
