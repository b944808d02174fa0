"""The checks of captions and keywords: against the tag rules, across a part, across characters."""

from __future__ import annotations

import re
from collections.abc import Iterator

from charfw.components import Finding
from charfw.lint import LintConfig, LintInput, finding
from charfw.stage_context import PartInfo


def _quoted(tags: list[str]) -> str:
    shown = ", ".join(f"'{t}'" for t in tags[:4])
    return shown + (f" and {len(tags) - 4} more" if len(tags) > 4 else "")


def _in_order(expected: list[str], actual: list[str]) -> bool:
    """``expected`` appears in ``actual`` in its order (other tags may sit between)."""
    rest = iter(actual)
    return all(any(tag == got for got in rest) for tag in expected)


def captions(inp: LintInput, config: LintConfig) -> Iterator[Finding]:
    """Captions the rules made that were changed since (caption-rules), and, where the rules
    did not tag, tags the rules put in every caption that only some captions have."""
    tagged = [img for img in inp.images if img.caption is not None]
    if inp.rules_tagged:
        for image in tagged:
            expected = inp.rule_captions.get(image.code or "")
            if expected is None:
                continue
            actual = image.caption or []
            missing = [t for t in expected if t not in actual]
            extra = [t for t in actual if t not in expected] if inp.rules_alone else []
            if missing or extra or not _in_order(expected, actual):
                what = []
                if missing:
                    what.append(f"missing {_quoted(missing)}")
                if extra:
                    what.append(f"not from the rules: {_quoted(extra)}")
                if not what:
                    what.append("the rules' tags in another order")
                yield finding("caption-rules", f"the caption no longer matches the tag rules (edited by hand?): "
                              f"{'; '.join(what)}; rebuild with --force --only tag, or change the rules "
                              "instead", file=image.caption_file, code=image.code)
        return
    codes = {img.code for img in tagged if img.code in inp.rule_captions}
    if len(tagged) < 2 or not codes:
        return
    common = [t for t in inp.rule_captions[min(codes)] if all(t in inp.rule_captions[c] for c in codes)]
    for tag in common:
        having = [img for img in tagged if tag in (img.caption or [])]
        if not having or len(having) == len(tagged):
            continue
        for image in tagged:
            if tag not in (image.caption or []):
                yield finding("caption-inconsistent", f"'{tag}' is in {len(having)} of the part's {len(tagged)} "
                              "captions but not in this one; the tag rules put it in every one",
                              file=image.caption_file, code=image.code)


def _words(text: str) -> set[str]:
    return {w for w in re.split(r"[\s,()\[\]{}:]+", text.lower()) if w}


def _family(part: PartInfo) -> set[str]:
    """The targets whose keywords may appear in a part's captions: its own, its members'."""
    out = {part.target}
    for member in part.members:
        out |= _family(member)
    return out


def keywords(inp: LintInput, config: LintConfig) -> Iterator[Finding]:
    part = inp.part
    own = _family(part)
    mine = {p.keyword.lower() for p in inp.workspace_parts if p.target in own} | {part.keyword.lower()}
    others = {p.keyword.lower(): p for p in inp.workspace_parts
              if p.target not in own and p.keyword.strip() and p.keyword.lower() not in mine}
    # a keyword in the part's own tags or class tokens (the manifest) is one finding, not one per caption
    manifest_words = _words(", ".join([part.class_tokens, *part.tags])) & set(others)
    for word in sorted(manifest_words):
        yield finding("keyword-foreign", f"'{word}', in {part.label}'s tags or class tokens, is the keyword of "
                      f"{others[word].label}, another character: this LoRA would learn it too; remove it from "
                      "the manifest")
    for image in inp.images:
        words: set[str] = set()
        for tag in image.caption or []:
            words |= _words(tag)
        for word in sorted((words & set(others)) - manifest_words):
            yield finding("keyword-foreign", f"'{word}' is the keyword of {others[word].label}, another character: "
                          "this LoRA would learn it too; remove it from the caption",
                          file=image.caption_file or image.file, code=image.code)
    if part.kind == "group":
        return
    for other in inp.workspace_parts:
        if other.label != part.label and other.keyword.strip().lower() == part.keyword.strip().lower():
            yield finding("keyword-collision", f"keyword '{part.keyword}' is also the keyword of {other.label}: both "
                          "LoRAs would train one word; give each part its own keyword")
