#!/usr/bin/env python3
"""Build (short description -> long description) text pairs from Debian bookworm main.

The lists are fetched with the machine's own apt configuration (no host is named here) into a
temporary lists dir, so the system's /var/lib/apt stays untouched. Output is deterministic:
the same input lists always give a byte-identical pairs.jsonl.gz.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

SUITE, COMPONENT, ARCH = "bookworm", "main", "amd64"
APT_HELPER = "/usr/lib/apt/apt-helper"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data" / "raw" / f"debian-{SUITE}"
# A wrapped line starting like a list item begins a new line instead of joining the previous one.
BULLET = re.compile(r"^([*+\u2022-]|\d+[.)])\s")
log = logging.getLogger("build_debian_snapshot")

Stanza = dict[str, list[str]]


def apt_update(work: Path) -> Path:
    """Run `apt-get update` into WORK/lists using the system sources but private state dirs."""
    lists, cache = work / "lists", work / "cache"
    (lists / "partial").mkdir(parents=True)
    (cache / "archives" / "partial").mkdir(parents=True)
    conf = work / "apt.conf"
    conf.write_text(
        "#clear Acquire::Languages;\n"  # container images often force Languages "none"
        'Acquire::Languages {"en";};\n'
        f'Dir::State::Lists "{lists}/";\n'
        f'Dir::Cache "{cache}/";\n'
    )
    work.chmod(0o755)  # apt's unprivileged _apt downloader must reach lists/partial
    start = time.monotonic()
    subprocess.run(["apt-get", "-q", "-c", str(conf), "update"], check=True)
    log.info("apt-get update took %.1fs", time.monotonic() - start)
    return lists


def read_list(path: Path) -> bytes:
    """Decompress a lists file whatever its compression (apt keeps .lz4/.xz/.gz as fetched)."""
    return subprocess.run([APT_HELPER, "cat-file", str(path)], check=True, capture_output=True).stdout


def find_list(lists_dir: Path, kind: str) -> re.Match[str]:
    """Return the name match of the single SUITE/COMPONENT list of KIND (not -updates/-security)."""
    pattern = re.compile(rf"(?P<prefix>.+_dists_{SUITE})_{COMPONENT}_{re.escape(kind)}(\.\w+)?")
    found = [m for p in sorted(lists_dir.iterdir()) if (m := pattern.fullmatch(p.name))]
    if len(found) != 1:
        names = [m.string for m in found]
        raise SystemExit(f"expected one {SUITE}/{COMPONENT} {kind} list in {lists_dir}, found {names}")
    return found[0]


def without_mirror(list_name: str) -> str:
    """apt prefixes list names with the mirror's path; provenance keeps only the archive-relative part."""
    return list_name[list_name.index("dists_"):]


def release_date(lists_dir: Path, prefix: str) -> tuple[str | None, str | None]:
    """Return (file name, Date:) of the InRelease/Release file a list came with, if present."""
    for name in (f"{prefix}_InRelease", f"{prefix}_Release"):
        if (lists_dir / name).is_file():
            date = re.search(r"^Date: (.+)$", read_list(lists_dir / name).decode("utf-8"), re.M)
            return name, date.group(1).strip() if date else None
    return None, None


def stanzas(text: str) -> Iterator[Stanza]:
    """Parse deb822 text into field -> [value, continuation lines (raw, leading space kept)]."""
    fields: Stanza = {}
    key = ""
    for line in text.split("\n"):
        if not line:
            if fields:
                yield fields
            fields, key = {}, ""
        elif line[0] in " \t":
            if key:
                fields[key].append(line)
        else:
            key, _, value = line.partition(":")
            fields[key] = [value.strip()]
    if fields:
        yield fields


def long_to_text(lines: list[str]) -> str:
    """Turn control-format continuation lines into plain text (Debian Policy 5.6.13).

    Wrapped text lines are joined with spaces; " ." becomes a blank line; verbatim lines
    (two leading spaces) and list items stay on their own line.
    """
    paragraphs: list[list[str]] = [[]]
    for raw in lines:
        line = raw[1:].rstrip()
        para = paragraphs[-1]
        if line in (".", ""):
            paragraphs.append([])
        elif para and not para[-1][:1].isspace() and not line[:1].isspace() and not BULLET.match(line):
            para[-1] += " " + line
        else:
            para.append(line)
    return "\n\n".join("\n".join(p) for p in paragraphs if p)


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file in the same dir + os.replace so readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def build(lists_dir: Path, out_dir: Path) -> dict[str, int]:
    """Join Packages with Translation-en on (package, Description-md5) and write the snapshot."""
    inputs, texts = [], {}
    for kind in ("i18n_Translation-en", f"binary-{ARCH}_Packages"):
        match = find_list(lists_dir, kind)
        raw = read_list(lists_dir / match.string)
        release_file, date = release_date(lists_dir, match.group("prefix"))
        inputs.append({"file": without_mirror(match.string), "sha256": hashlib.sha256(raw).hexdigest(),
                       "release_file": release_file and without_mirror(release_file), "release_date": date})
        texts[kind] = raw.decode("utf-8")
        log.info("read %s (%d bytes decompressed)", match.string, len(raw))

    translations = {(s["Package"][0], s["Description-md5"][0]): s["Description-en"]
                    for s in stanzas(texts["i18n_Translation-en"])}
    packages: dict[str, tuple[str, list[str] | None]] = {}
    for s in stanzas(texts[f"binary-{ARCH}_Packages"]):
        name = s["Package"][0]
        source = s["Source"][0].split()[0] if "Source" in s else name
        md5 = s.get("Description-md5")
        desc = translations.get((name, md5[0])) if md5 else s.get("Description")
        if name in packages and packages[name] != (source, desc):
            log.warning("%s listed more than once with different source/description; keeping first", name)
        packages.setdefault(name, (source, desc))

    rows, missing, empty = [], 0, 0
    for name in sorted(packages):
        source, desc = packages[name]
        if desc is None:
            missing += 1
            continue
        positive = long_to_text(desc[1:])
        if not positive:
            empty += 1
            continue
        rows.append({"id": name, "query": desc[0], "positive": positive, "package": name, "source": source})
    if missing:
        log.warning("%d packages have no English description in Translation-en", missing)

    out_dir.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    pairs_path = out_dir / "pairs.jsonl.gz"
    compressed = gzip.compress(payload, compresslevel=9, mtime=0)
    write_atomic(pairs_path, compressed)
    counts = {
        "translation_en_packages": len({name for name, _ in translations}),
        "packages_packages": len(packages),
        "pairs_written": len(rows),
        "dropped_empty_long_description": empty,
        "dropped_missing_translation": missing,
        "distinct_sources": len({r["source"] for r in rows}),
    }
    apt = subprocess.run(["apt-get", "--version"], check=True, capture_output=True, text=True)
    provenance = {
        "suite": SUITE, "component": COMPONENT, "architecture": ARCH,
        "build_date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "apt_version": apt.stdout.split()[1], "inputs": inputs, "counts": counts,
        "output": {"file": pairs_path.name, "sha256": hashlib.sha256(compressed).hexdigest(),
                   "bytes": len(compressed)},
    }
    prov_text = json.dumps(provenance, indent=2, ensure_ascii=False) + "\n"
    write_atomic(out_dir / "provenance.json", prov_text.encode("utf-8"))
    return {**counts, "bytes": len(compressed)}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: fetch lists (unless --lists-dir is given), build, print a summary."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lists-dir", type=Path,
                        help="read already-downloaded apt lists from DIR instead of running apt-get update")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT,
                        help="output dir (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="debian-lists-") as work:
        summary = build(args.lists_dir or apt_update(Path(work)), args.out_dir)
    print(f"pairs={summary['pairs_written']} sources={summary['distinct_sources']} "
          f"dropped_empty={summary['dropped_empty_long_description']} "
          f"size={summary['bytes'] / 1e6:.1f} MB -> {args.out_dir / 'pairs.jsonl.gz'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
