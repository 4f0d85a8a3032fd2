"""Raw corpus -> a `datasets.Dataset` of documents (one `text` per row).

Inputs: plain-text files (documents separated by blank lines, one per line, or one per file),
folders of them, glob patterns, `.jsonl`/`.json`/`.csv`/`.parquet` with a text field, and `.gz`
of any of these. `pkg://PACKAGE/sub/path*.txt` names files inside an installed Python package
(found through importlib, so recipes never hold one machine's paths).

Every file is checked (exists, not empty, UTF-8 text) before anything is read in bulk.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import sys
from pathlib import Path

from toolkit.errors import ToolkitError
from toolkit.paths import resolve_path

TEXT_SUFFIXES = (".txt", ".text", ".md", ".raw", "")
STRUCTURED = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def expand(specs: list[str], what: str = "data.train_files") -> list[Path]:
    """Files, folders (recursively), globs and pkg:// names -> a sorted list of existing files."""
    files: list[Path] = []
    for spec in specs:
        spec = resolve_path(spec)
        if glob.has_magic(spec):
            matched = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not matched:
                raise ToolkitError(f"{what}: no file matches '{spec}'")
            files += matched
        elif Path(spec).is_dir():
            matched = sorted(p for p in Path(spec).rglob("*") if p.is_file() and not p.name.startswith("."))
            if not matched:
                raise ToolkitError(f"{what}: folder '{spec}' holds no files")
            files += matched
        elif Path(spec).is_file():
            files.append(Path(spec))
        else:
            raise ToolkitError(f"{what}: file not found: '{spec}' (check the path, or the working directory)")
    seen, unique = set(), []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def file_format(path: Path) -> tuple[str, bool]:
    """('text' | 'json' | 'csv' | 'parquet', gzipped)."""
    name = path.name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    suffix = Path(name).suffix
    if suffix in STRUCTURED:
        return STRUCTURED[suffix], gz
    return "text", gz


def check_file(path: Path) -> None:
    """Stop early on an empty or binary file, with a message that names it."""
    fmt, gz = file_format(path)
    if path.stat().st_size == 0:
        raise ToolkitError(f"'{path}' is empty: remove it from the file list or add text to it")
    if fmt == "parquet":
        return
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(1 << 16)
    except (OSError, EOFError) as e:
        raise ToolkitError(f"cannot read '{path}': {e}") from None
    if not head.strip():
        raise ToolkitError(f"'{path}' is empty (only whitespace): remove it or add text to it")
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        decoder.decode(head, final=False)
    except UnicodeDecodeError:
        raise ToolkitError(f"'{path}' is not UTF-8 text (binary file?): convert it to UTF-8 or remove it") from None
    if b"\x00" in head:
        raise ToolkitError(f"'{path}' looks binary (it contains NUL bytes): give text files only")


def fingerprint(files: list[Path]) -> list[tuple[str, int, int]]:
    """What identifies the inputs for caching: path, size and modification time of each file."""
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def first_bad_bytes(path: Path, fmt: str) -> str | None:
    """Where `path` stops being readable as `fmt`: 'line L (byte B): reason', or None. Streams the
    whole file (gzip included) in 1 MiB chunks; JSON lines are parsed one by one (only called after
    a read has failed, so its cost is paid only then)."""
    opener = gzip.open if file_format(path)[1] else open
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    try:
        with opener(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                try:
                    decoder.decode(chunk, final=False)
                except UnicodeDecodeError as e:
                    where, at = offset + e.start, line + chunk.count(b"\n", 0, e.start)
                    return f"line {at} (byte {where}): invalid UTF-8"
                line += chunk.count(b"\n")
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"line {line} (byte {offset}): the file ends inside a UTF-8 character"
    except (OSError, EOFError) as e:
        return f"byte {offset}: {e}"
    if fmt == "json" and path.name.lower().removesuffix(".gz").endswith(".jsonl"):
        offset = 0
        with opener(path, "rb") as fh:
            for number, raw in enumerate(fh, 1):
                text = raw.strip()
                if text:
                    try:
                        row = json.loads(text)
                    except ValueError as e:
                        return f"line {number} (byte {offset}): not valid JSON ({e})"
                    if not isinstance(row, dict):
                        return f"line {number} (byte {offset}): a JSON line must be an object, got {type(row).__name__}"
                offset += len(raw)
    return None


def unreadable(paths: list[str], fmt: str, error: BaseException, what: str = "") -> ToolkitError:
    """One clear error for a file the `datasets` builders could not read: the file, line and byte
    offset of the first bad bytes when they can be found, else the root cause's first line."""
    for p in paths:
        where = first_bad_bytes(Path(p), fmt)
        if where:
            return ToolkitError(f"{what}{': ' if what else ''}cannot read '{p}' as {fmt}, {where}: fix or remove it")
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    reason = (str(cause).splitlines() or [type(cause).__name__])[0][:300]
    return ToolkitError(f"{what}{': ' if what else ''}cannot read {', '.join(paths)} as {fmt}: {reason}")


def load_documents(files: list[Path], text_field: str, document_boundary: str, max_missing_share: float = 0.1):
    """Read files into one Dataset with a single `text` column of non-empty documents. Rows of
    structured files without the text field are dropped and counted; more than `max_missing_share`
    of them missing stops the run (the wrong data.text_field, most likely)."""
    import datasets

    for f in files:
        check_file(f)
    parts = []
    by_format: dict[str, list[str]] = {}
    for f in files:
        by_format.setdefault(file_format(f)[0], []).append(str(f))
    sample_by = {"blank_line": "paragraph", "line": "line", "file": "document"}[document_boundary]
    for fmt, paths in by_format.items():
        try:
            if fmt == "text":
                ds = datasets.load_dataset("text", data_files=paths, sample_by=sample_by, split="train")
            else:
                ds = datasets.load_dataset(fmt, data_files=paths, split="train")
        except Exception as e:  # the builders raise many types for malformed files
            raise unreadable(paths, fmt, e) from None
        if fmt != "text":
            if text_field not in ds.column_names:
                raise ToolkitError(
                    f"no column '{text_field}' in {', '.join(paths)}: the columns are "
                    f"{', '.join(ds.column_names)}; set data.text_field to one of them"
                )
            missing = ds.data.column(text_field).null_count
            if missing:
                share = missing / max(len(ds), 1)
                note = f"{missing} of {len(ds)} rows ({share:.1%}) of {', '.join(paths)} have no '{text_field}'"
                if share > max_missing_share:
                    raise ToolkitError(
                        f"{note}, more than data.max_missing_text_share={max_missing_share}: check data.text_field, "
                        "or raise that share to drop them"
                    )
                print(f"note: {note}: dropped", file=sys.stderr)
            kind = ds.features[text_field]
            if not isinstance(kind, datasets.Value):  # lists, objects: no text to read
                raise ToolkitError(
                    f"column '{text_field}' of {', '.join(paths)} does not hold strings only (it reads as "
                    f"{type(kind).__name__.lower()}): point data.text_field at a column of strings"
                )
            ds = ds.select_columns([text_field])
            if text_field != "text":
                ds = ds.rename_column(text_field, "text")
            ds = ds.cast_column("text", datasets.Value("string"))
        parts.append(ds)
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    ds = ds.map(_strip, batched=True, desc="Cleaning documents")
    return ds.filter(lambda batch: [len(t) > 0 for t in batch["text"]], batched=True, desc="Dropping empty documents")


def _strip(batch):
    return {"text": [(t or "").strip() for t in batch["text"]]}


def map_documents(docs, encode, num_proc: int | None, desc: str):
    """`docs.map(encode)` in batches of 1,000 documents, in several processes for large corpora
    (num_proc None: one per core, up to 8, from 20,000 documents on)."""
    import os

    if num_proc is None:
        num_proc = min(os.cpu_count() or 1, 8) if len(docs) >= 20_000 else None
    return docs.map(
        encode,
        batched=True,
        batch_size=1000,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        remove_columns=docs.column_names,
        desc=desc,
    )
