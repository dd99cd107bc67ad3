"""The lab's record files, read whole or refused naming the file, written whole or not at all; runs grouped by
method. ``report`` (classification) and ``generation_report`` both read and write through here.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .train import Result

RECORD_KEYS = ("task", "budget", "command", "status", "results")  # what every comparison.json holds


def read_json(path) -> dict:
    """The JSON object in ``path``. A missing, unreadable, truncated or non-object file raises ``ValueError``
    naming the file and what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno}: truncated by an "
                         "interrupted write?); remake it, or move it away") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not the object of a record")
    return data


def read_record(path) -> dict:
    """A ``comparison.json`` as stored (runs as dicts), checked: its keys and at least one run (``ValueError``
    naming the file otherwise)."""
    record = read_json(path)
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"{path} is not a comparison record: it lacks {missing} (a record has {list(RECORD_KEYS)})")
    if not isinstance(record["results"], list) or not record["results"]:
        raise ValueError(f"{path} holds no runs (its \"results\" is {record['results']!r}, not a list of runs)")
    for i, d in enumerate(record["results"]):
        try:
            Result.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: run {i} of \"results\" is not a run ({e})") from None
    return record


def load_record(path) -> dict:
    """A ``comparison.json``: its metadata and its runs (``record["results"]`` as ``Result`` objects)."""
    record = read_record(path)
    record["results"] = [Result.from_dict(d) for d in record["results"]]
    return record


def write_atomic(path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all: into a temporary file next to it, then renamed over it (a
    reader never sees half a file). On any failure (a full disk, a folder in the way, an interrupt) the temporary
    file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path, record: dict) -> Path:
    """``write_atomic`` of a record as indented JSON."""
    return write_atomic(path, json.dumps(record, indent=1) + "\n")


def save_figure(fig, path) -> Path:
    """``write_atomic`` of a matplotlib figure (format from the suffix of ``path``); closes the figure."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=120)
    finally:
        plt.close(fig)
    return write_atomic(path, buffer.getvalue())


def check_output_dir(directory, files=()) -> None:
    """Refuse, before any work, an output folder that could not take the results: ``directory`` (made later if
    missing) or a folder above it is a file, the nearest existing folder cannot be written, or one of ``files``
    (names inside ``directory``) is in the way as a folder. Creates nothing; ``ValueError`` names the path."""
    directory = Path(directory)
    existing = next(p for p in [directory, *directory.parents] if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise ValueError(f"output folder {directory}: {existing} is a file, not a folder; choose another --out")
    try:  # a real write (os.access says yes to root on a read-only mount): a probe file, removed at once
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ValueError(f"output folder {directory}: cannot write in {existing} ({e.strerror}); "
                         "choose another --out") from None
    blocked = [directory / f for f in files if (directory / f).exists() and not (directory / f).is_file()]
    if blocked:
        raise ValueError(f"output folder {directory}: {blocked[0]} is in the way (not a file); move it away")


def by_method(results: list[Result]) -> dict[str, list[Result]]:
    """method -> its runs sorted by seed, methods in the order they were run."""
    out: dict[str, list[Result]] = {}
    for r in results:
        out.setdefault(r.method, []).append(r)
    return {m: sorted(rs, key=lambda r: r.seed) for m, rs in out.items()}


def training_memory_mb(r: Result) -> float:
    """The measured training memory, weights included: on CPU ``peak_memory_mb`` is the rise over the memory at
    the start (the fp32 weights, 4 bytes each, were already loaded), so they are added back; on CUDA it is total."""
    return r.peak_memory_mb + (4 * r.total_params / 2**20 if "rise" in r.memory_measure else 0.0)


def added_lines(record: dict) -> str:
    """One paragraph per addition to ``record`` (``compare --add``): its command and the machine it ran on (a run's
    s/step compares only with runs of the same machine)."""
    return "".join(f"Added by: `{a['command']}` ({a['machine']['cpu']}; load average at the start "
                   f"{a['machine']['load_average']['start']}, at the end {a['machine']['load_average']['end']})\n\n"
                   for a in record.get("added", []))
