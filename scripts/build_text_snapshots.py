#!/usr/bin/env python3
"""Build the non-Debian text snapshots from Debian's dictionary packages: general English for the student's
distillation, and two out-of-domain retrieval sets for evaluation.

- `data/raw/general-text/texts.jsonl.gz`: WordNet 3.0 synsets (`wordnet-base`: the words and their gloss) and
  Webster's 1913 senses (`dict-gcide`), one text each with its title (the words, the headword), a deterministic
  sample. Unlabelled: distillation needs only the teacher's embeddings of each text and title.
- `data/raw/ood/foldoc` and `data/raw/ood/jargon`: BEIR sets (query = a term, relevant passage = its entry) from
  the Free On-line Dictionary of Computing (`dict-foldoc`, without the entries it took from the Jargon File)
  and the Jargon File (`dict-jargon`). Neither source feeds any training stage.

The packages are fetched with the machine's own apt configuration (`apt-get download`; no host is named here)
and each snapshot records the package versions and .deb hashes it came from. The same packages always give
byte-identical files. Man pages and the Python documentation are never read: they are held out.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"wordnet-base": "wordnet", "dict-gcide": "gcide", "dict-foldoc": "foldoc", "dict-jargon": "jargon"}
GENERAL_TEXTS = {"wordnet": 20_000, "gcide": 20_000}  # texts kept from each general source
OOD_QUERIES = 1_000  # queries per out-of-domain set
OOD_EXTRA_PASSAGES = 1_000  # entries beyond the queries' own in each corpus, as distractors
MIN_PASSAGE_CHARS, MAX_PASSAGE_CHARS = 80, 1_500
MIN_GENERAL_CHARS, MAX_GENERAL_CHARS = 40, 600
DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
log = logging.getLogger("build_text_snapshots")


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    deb_sha256: str
    root: Path  # where the .deb was unpacked


def fetch(names: list[str], work: Path) -> dict[str, Package]:
    """Download and unpack each package (no installation, no root needed beyond apt's own download)."""
    work.chmod(0o755)  # apt's unprivileged downloader writes here
    subprocess.run(["apt-get", "-q", "download", *names], cwd=work, check=True, capture_output=True)
    packages = {}
    for name in names:
        deb = next(work.glob(f"{name}_*.deb"))
        version = subprocess.run(["dpkg-deb", "--field", str(deb), "Version"], check=True, capture_output=True,
                                 text=True).stdout.strip()
        root = work / name
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        packages[name] = Package(name, version, hashlib.sha256(deb.read_bytes()).hexdigest(), root)
    return packages


def dictd_entries(package: Package, dictionary: str) -> Iterator[tuple[list[str], str]]:
    """(headwords, entry text) of each entry of a dictd dictionary, in file order; an entry several headwords
    point at comes once, an entry that is not valid UTF-8 (a few of GCIDE's) not at all."""
    base = package.root / "usr/share/dictd" / dictionary
    data = gzip.decompress((base.parent / f"{dictionary}.dict.dz").read_bytes())
    headwords: dict[tuple[int, int], list[str]] = {}
    for line in (base.parent / f"{dictionary}.index").read_text(encoding="utf-8").splitlines():
        headword, offset, length = line.split("\t")[:3]
        if headword.startswith("00-database"):
            continue
        headwords.setdefault((_dictd_number(offset), _dictd_number(length)), []).append(headword)
    for (offset, length), words in sorted(headwords.items()):
        try:
            yield words, data[offset:offset + length].decode("utf-8")
        except UnicodeDecodeError:
            continue


def _dictd_number(digits: str) -> int:
    value = 0
    for digit in digits:
        value = value * 64 + DICTD_DIGITS.index(digit)
    return value


def clean(text: str) -> str:
    """Plain prose: cross-reference braces and URLs dropped, whitespace collapsed."""
    text = re.sub(r"\{\(?(https?|ftp|mailto):[^}]*\)?\}|https?://\S+", " ", text)
    text = re.sub(r"[{}]", "", text)
    return re.sub(r"\s+", " ", text).strip()


def entry_body(entry: str) -> tuple[str, str]:
    """(title, body) of a FOLDOC or Jargon File entry: the title is its first line; the body drops the title
    lines, pronunciation and part-of-speech lines, and FOLDOC's closing date."""
    lines = entry.strip("\n").splitlines()
    title = lines[0].strip()
    body = [line for line in lines[1:] if line.startswith((" ", "\t")) or not line.strip()]
    text = clean("\n".join(body))
    text = re.sub(r"^(/[^/]*/,?\s*)*((n|v|adj|adv|excl|pl|vt|vi|interj|prep|pron)\.\s*,?\s*)*", "", text)
    text = re.sub(r"\(\d{4}-\d{2}-\d{2}\)\s*$", "", text).strip()
    return title, text


def stable_order(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def ood_set(entries: Iterator[tuple[list[str], str]], skip: re.Pattern[str] | None) -> dict[str, dict]:
    """A BEIR set: OOD_QUERIES titled entries as (title -> entry) pairs, and OOD_EXTRA_PASSAGES more entries
    in the corpus, all chosen by a hash of the title."""
    kept: dict[str, str] = {}
    for _, entry in entries:
        if skip is not None and skip.search(entry):
            continue
        title, body = entry_body(entry)
        if len(title) < 2 or not MIN_PASSAGE_CHARS <= len(body) or title.lower() in kept:
            continue
        kept[title.lower()] = (title, body[:MAX_PASSAGE_CHARS])
    chosen = sorted(kept, key=stable_order)[:OOD_QUERIES + OOD_EXTRA_PASSAGES]
    corpus = {f"d{index}": kept[key][1] for index, key in enumerate(chosen)}
    queries = {f"q{index}": kept[key][0] for index, key in enumerate(chosen[:OOD_QUERIES])}
    qrels = {f"q{index}": {f"d{index}": 1} for index in range(len(queries))}
    return {"corpus": corpus, "queries": queries, "qrels": qrels, "eligible_entries": len(kept)}


def wordnet_texts(package: Package) -> dict[str, tuple[str, str]]:
    """(title 'word, synonym', text 'word, synonym: gloss') for every synset of the four parts of speech."""
    texts = {}
    for part in ("noun", "verb", "adj", "adv"):
        for line in (package.root / "usr/share/wordnet" / f"data.{part}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            words = [parts[4 + 2 * index].replace("_", " ") for index in range(int(parts[3], 16))]
            words = [re.sub(r"\(\w+\)$", "", word) for word in words]
            title = clean(", ".join(dict.fromkeys(words)))
            texts[f"wordnet:{part}:{parts[0]}"] = (title, clean(f"{title}: {gloss}"))
    return texts


def gcide_texts(package: Package) -> dict[str, tuple[str, str]]:
    """(headword, 'headword: sense') for the senses of Webster's 1913 entries (GCIDE's WordNet 1.5 entries left to
    WordNet)."""
    texts = {}
    for words, entry in dictd_entries(package, "gcide"):
        if "[1913 Webster]" not in entry:
            continue
        text = re.sub(r"\\[^\\]*\\,?", "", entry)  # pronunciations
        text = re.sub(r"\[(1913 Webster|PJC|Obs\.|R\.|Colloq\.|Webster 1913 Suppl\.)\]", " ", text)
        title = words[0]
        for number, sense in enumerate(re.split(r"\n\s*\d+\.\s", text)[1:] or [text.split("\n", 1)[-1]]):
            sense = clean(sense.split("Syn:")[0])
            if sense:
                texts[f"gcide:{title}:{number}"] = (title, f"{title}: {sense}")
    return texts


def general_sample(texts: dict[str, tuple[str, str]], count: int) -> list[dict[str, str]]:
    """`count` rows (id, title, text), chosen by a hash of the id among the texts of a fitting length. The title
    (the headword) is what a search box would be asked; the text is the entry."""
    fitting = [key for key, (_, text) in texts.items() if MIN_GENERAL_CHARS <= len(text) <= MAX_GENERAL_CHARS]
    chosen = sorted(fitting, key=stable_order)[:count]
    return [{"id": key, "title": texts[key][0], "text": texts[key][1]} for key in sorted(chosen)]


def provenance(packages: list[Package], counts: dict[str, int]) -> dict:
    return {"packages": [{"name": package.name, "version": package.version, "deb_sha256": package.deb_sha256}
                         for package in packages],
            "built_by": "scripts/build_text_snapshots.py", "counts": counts}


def write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build(out: Path, work: Path) -> None:
    from components.data import BeirDataset, write_beir

    packages = fetch(list(PACKAGES), work)
    wordnet, gcide = packages["wordnet-base"], packages["dict-gcide"]
    general = (general_sample(wordnet_texts(wordnet), GENERAL_TEXTS["wordnet"])
               + general_sample(gcide_texts(gcide), GENERAL_TEXTS["gcide"]))
    target = out / "general-text"
    target.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in general).encode()
    (target / "texts.jsonl.gz").write_bytes(gzip.compress(payload, mtime=0))
    write_json(target / "provenance.json", provenance([wordnet, gcide], {"texts": len(general)} | {
        source: sum(row["id"].startswith(f"{source}:") for row in general) for source in GENERAL_TEXTS}))
    log.info("general text: %d texts", len(general))

    jargon_marker = re.compile(r"Jargon File", re.IGNORECASE)
    for package_name, skip in (("dict-foldoc", jargon_marker), ("dict-jargon", None)):
        package, dictionary = packages[package_name], PACKAGES[package_name]
        built = ood_set(dictd_entries(package, dictionary), skip)
        target = out / "ood" / dictionary
        write_beir(target, BeirDataset(corpus=built["corpus"], queries=built["queries"], qrels=built["qrels"]))
        write_json(target / "provenance.json", provenance([package], {
            "eligible_entries": built["eligible_entries"], "queries": len(built["queries"]),
            "corpus": len(built["corpus"])}) | {"task": "query = an entry's title (a term); relevant passage = "
                                                          "its definition"})
        log.info("%s: %d queries, %d passages", dictionary, len(built["queries"]), len(built["corpus"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "data" / "raw")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as work:
        build(args.out, Path(work))


if __name__ == "__main__":
    main()
