"""Plain article text from gensim's Wikipedia sample (a MediaWiki XML dump, bz2)."""
from __future__ import annotations

import bz2
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

_NS = re.compile(r"^\{[^}]*\}")


def _local(tag: str) -> str:
    return _NS.sub("", tag)


def iter_articles(dump: Path, min_chars: int = 200) -> Iterator[str]:
    """Article bodies with wiki markup stripped (mwparserfromhell), redirects skipped."""
    import mwparserfromhell

    with bz2.open(dump, "rb") as stream:
        for _, elem in ET.iterparse(stream, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            text = ""
            for child in elem.iter():
                if _local(child.tag) == "text" and child.text:
                    text = child.text
            elem.clear()
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            plain = mwparserfromhell.parse(text).strip_code(normalize=True, collapse=True)
            plain = re.sub(r"\n{3,}", "\n\n", plain).strip()
            if len(plain) >= min_chars:
                yield plain
