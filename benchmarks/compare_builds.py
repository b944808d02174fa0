"""Compare two build/ trees: do two versions of charfw make the same outputs?

    python benchmarks/compare_builds.py WS_A/build WS_B/build

For refactors that must not change what a build makes: build the same workspace copy with
each version (for example the old one through ``PYTHONPATH`` pointing at a checkout), then
compare. Every output file is compared by content, with what is not an output left out:

* ``.cache/``, ``.charfw/`` (caches and build state), per-image ``.memo/`` entries and
  TensorBoard ``logs/``;
* in records, everything but the stage's output (fingerprints and keys change when the
  engine's record layout does; timings always do), with the summary lines left out;
* the hash segment of intermediate image names (``f00.<key>.png``: the per-image cache key);
* in LoRA headers, the times and the values derived from them (``modelspec.date``,
  ``ss_training_started_at``/``finished_at``, ``ss_session_id``, ``sshs_legacy_hash``),
  unless both builds ran with the same ``SOURCE_DATE_EPOCH``;
* the two workspaces' own paths (written into dataset configs) when they have the same length.

Prints the number of files on each side and every file that differs.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

TIME_KEYS = {"modelspec.date", "ss_training_started_at", "ss_training_finished_at", "ss_session_id",
             "sshs_legacy_hash"}
HASHED_NAME = re.compile(r"\.[0-9a-f]{10}\.png")


def digest(path: Path, roots: list[str]) -> str:
    data = path.read_bytes()
    for root in roots:
        data = data.replace(root.encode(), b"<workspace>")
    if path.suffix == ".safetensors":
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        meta = {k: v for k, v in header.pop("__metadata__", {}).items() if k not in TIME_KEYS}
        return hashlib.sha256(json.dumps([header, meta], sort_keys=True).encode() + data[8 + n :]).hexdigest()
    if path.suffix != ".png":
        data = HASHED_NAME.sub(".png", data.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")
    if path.name == "record.json":
        output = json.loads(data)["output"]
        output.pop("summary", None)
        data = json.dumps(output, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def tree(build: Path, roots: list[str]) -> dict[str, str]:
    out = {}
    for path in sorted(build.rglob("*")):
        rel = path.relative_to(build).as_posix()
        if not path.is_file() or rel.startswith((".cache/", ".charfw/")) or "/.memo/" in rel or "/logs/" in rel:
            continue
        out[HASHED_NAME.sub(".png", rel)] = digest(path, roots)
    return out


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    a, b = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    roots = [str(a.parent), str(b.parent)] if len(str(a.parent)) == len(str(b.parent)) else []
    ta, tb = tree(a, roots), tree(b, roots)
    differ = sorted(k for k in set(ta) | set(tb) if ta.get(k) != tb.get(k))
    print(f"{len(ta)} files in {a}, {len(tb)} in {b}; {len(differ)} differ")
    for key in differ:
        where = " (only in the first)" if key not in tb else " (only in the second)" if key not in ta else ""
        print(f"  {key}{where}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
