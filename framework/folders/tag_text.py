"""How tags are written: Danbooru names to caption text, A1111 escaping, caption files.

Three conventions meet in a caption file and are easy to mix up:

* Danbooru (and so WD14's ``selected_tags.csv``) writes ``long_hair``; captions for SD
  write ``long hair``. Replacing every underscore breaks kaomoji (``^_^`` is a face, not
  ``^ ^``), so the 19 kaomoji of the official WD14 app keep theirs.
* AUTOMATIC1111 reads ``(`` ``)`` as attention syntax. Tags such as ``star (symbol)``
  must be escaped as ``star \\(symbol\\)`` *for prompts*, and ``\\`` first because real
  names contain it (``\\m/``). kohya reads plain captions literally, so escaping is
  only done when asked for (prompts, or kohya's ``--weighted_captions``).
* A caption is tags separated by ``, ``. Comparing tags across sources (a rule's
  ``from side`` and WD14's ``from_side``, an escaped and an unescaped copy) needs one
  normal form: :func:`tag_key`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: the kaomoji whose underscores are part of the face (SmilingWolf's wd-tagger app)
KAOMOJI: frozenset[str] = frozenset({
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9",
    ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
})

_A1111_SPECIAL = re.compile(r"([\\()])")
_A1111_ESCAPED = re.compile(r"\\([\\()])")
_SPACES = re.compile(r"\s+")


def danbooru_to_caption(name: str) -> str:
    """``long_hair`` → ``long hair``; kaomoji keep their underscores."""
    return name if name in KAOMOJI else name.replace("_", " ")


def escape_a1111(tag: str) -> str:
    """Escape ``\\``, ``(`` and ``)`` so A1111 reads them literally (backslash first)."""
    return _A1111_SPECIAL.sub(r"\\\1", tag)


def unescape_a1111(tag: str) -> str:
    return _A1111_ESCAPED.sub(r"\1", tag)


def tag_key(tag: str) -> str:
    """The form two tags are compared in: unescaped, lower case, spaces for underscores
    (except in kaomoji), single spaces."""
    text = unescape_a1111(tag.strip()).lower()
    text = danbooru_to_caption(text)
    return _SPACES.sub(" ", text).strip()


def split_caption(text: str) -> list[str]:
    """The tags of a caption file's text, in order, without empty entries."""
    return [t.strip() for t in text.replace("\n", ",").split(",") if t.strip()]


def join_caption(tags: Iterable[str]) -> str:
    return ", ".join(tags)


def unique_tags(tags: Iterable[str]) -> list[str]:
    """Tags in order with later copies (by :func:`tag_key`) left out."""
    seen: set[str] = set()
    out = []
    for tag in tags:
        key = tag_key(tag)
        if key and key not in seen:
            seen.add(key)
            out.append(tag)
    return out
