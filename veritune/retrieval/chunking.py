"""Documents cut into chunks: sentence-aligned word windows with overlap.

Each chunk is embedded as `title + "\\n" + text` (`embedding_text`): the title carries the
product name, which the body often only calls "the device". The same text feeds Milvus'
full-text (BM25) field.
"""

from __future__ import annotations

import re
from typing import Any

_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*$")


def embedding_text(chunk: dict[str, Any]) -> str:
    """What is embedded for a chunk: the title carries the product name the text may omit."""
    return f"{chunk['title']}\n{chunk['text']}"


def _sentence_units(text: str, spans: list[tuple[int, int]], max_words: int) -> list[tuple[int, int]]:
    """Word ranges [start, end) of sentences; a sentence over `max_words` is cut into pieces.

    A sentence ends at a word ending in . ! or ? (closing quotes/brackets allowed) or at a
    line break, so headings and list items are units of their own.
    """
    units = []
    start = 0
    for i, (_, word_end) in enumerate(spans):
        last = i == len(spans) - 1
        if last or _SENTENCE_END.search(text[spans[i][0] : word_end]) or "\n" in text[word_end : spans[i + 1][0]]:
            for piece_start in range(start, i + 1, max_words):
                units.append((piece_start, min(piece_start + max_words, i + 1)))
            start = i + 1
    return units


def _windows(units: list[tuple[int, int]], chunk_words: int, overlap_words: int) -> list[tuple[int, int]]:
    """Pack sentence units into word windows of at most `chunk_words`.

    Each window after the first starts with the whole trailing sentences of the previous one
    that fit in `overlap_words`; when the last sentence alone is longer, with its last
    `overlap_words` words. Units are at most `chunk_words - overlap_words` long, so every
    window takes at least one new unit and the loop always advances.
    """
    windows = []
    start, u = 0, 0
    while u < len(units):
        end = units[u][1]
        u += 1
        while u < len(units) and units[u][1] - start <= chunk_words:
            end = units[u][1]
            u += 1
        windows.append((start, end))
        if u == len(units):
            break
        sentence_starts = [s for s, _ in units if start <= s < end and end - s <= overlap_words]
        start = min(sentence_starts) if sentence_starts else end - overlap_words
    return windows


def chunk_document(
    doc: dict[str, Any], chunk_words: int, overlap_words: int, entity_field: str = ""
) -> list[dict[str, Any]]:
    """Split a document into chunks of at most `chunk_words` whitespace words.

    Chunks end at sentence boundaries where possible and keep the document's own spacing
    and line breaks. A document of at most `chunk_words` words is one chunk. Returns
    `{"chunk_id": f"{doc_id}#{i}", "doc_id", "title", "text", "entity"}` in document order;
    `entity` is the document's `entity_field` (the product it describes), "" without one.
    """
    if chunk_words < 1:
        raise ValueError(f"chunk_words must be >= 1, got {chunk_words}")
    if not 0 <= overlap_words < chunk_words:
        raise ValueError(f"overlap_words must be in [0, chunk_words={chunk_words}), got {overlap_words}")
    doc_id = doc.get("id")
    for field in ("id", "title", "text"):
        if not isinstance(doc.get(field), str):
            raise ValueError(f"document {doc_id!r}: field {field!r} must be a string, got {doc.get(field)!r}")
    text = doc["text"]
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    if len(spans) <= chunk_words:
        windows = [(0, len(spans))]
    else:
        units = _sentence_units(text, spans, max_words=chunk_words - overlap_words)
        windows = _windows(units, chunk_words, overlap_words)
    entity = doc.get(entity_field) if entity_field else None
    if entity is not None and not isinstance(entity, str):
        raise ValueError(f"document {doc_id!r}: field {entity_field!r} must be a string or null, got {entity!r}")
    chunks = []
    for i, (start, end) in enumerate(windows):
        chunk_text = text[spans[start][0] : spans[end - 1][1]] if end > start else ""
        chunks.append(
            {
                "chunk_id": f"{doc_id}#{i}",
                "doc_id": doc_id,
                "title": doc["title"],
                "text": chunk_text,
                "entity": entity or "",
            }
        )
    return chunks
