"""``charfw collect``: images from Bing image search into a folder (the seed's crawl_images.py).

The seed's options are accepted under their old spellings too (``--max_num``,
``--out_dir``). A run can be interrupted and repeated: URLs and image contents already
seen are skipped (see :mod:`charfw.prep.bing`). Next steps for the images are
usually ``charfw dedup`` and ``charfw rembg``.
"""

from __future__ import annotations

from pathlib import Path

import click

import charfw
from charfw import console
from charfw.errors import display_path


@charfw.hookimpl
def register_commands(cli):
    from charfw.prep.bing import BING_ENDPOINT, COLOR_FILTERS, TYPE_FILTERS

    @cli.command("collect")
    @click.option("-q", "--query", required=True, help='What to search for, e.g. "猫 かわいい イラスト".')
    @click.option("--type", "image_type", type=click.Choice(sorted(TYPE_FILTERS)),
                  help="Kind of image (illustration = Bing's clip art).")
    @click.option("--color", type=click.Choice(sorted(COLOR_FILTERS)), help="Colour filter (mono = black and white).")
    @click.option("-n", "--max-num", "--max_num", "max_num", type=click.IntRange(1, 1000), default=100,
                  show_default=True, help="How many images the folder should get for this query.")
    @click.option("-o", "--out", "--out-dir", "--out_dir", "out", required=True,
                  type=click.Path(file_okay=False, path_type=Path), help="Folder to save into.")
    @click.option("--min-size", type=click.IntRange(1, 10000), default=64, show_default=True,
                  help="Skip images whose shorter side is smaller.")
    @click.option("--delay", type=click.FloatRange(0, 60), default=1.0, show_default=True,
                  help="Seconds between result pages.")
    @click.option("--workers", type=click.IntRange(1, 16), default=4, show_default=True,
                  help="Parallel image downloads.")
    @click.option("--timeout", type=click.FloatRange(1, 300), default=15.0, show_default=True)
    @click.option("--endpoint", default=BING_ENDPOINT, hidden=True, help="Result page URL (tests).")
    def collect_command(query, image_type, color, max_num, out, min_size, delay, workers, timeout, endpoint):
        """Download images found by Bing image search into a folder.

        Resumable: run it again to continue; URLs and image contents already seen are
        skipped. A record of every URL is kept in OUT/.charfw-collect.json."""
        from charfw.prep.bing import CollectState, collect

        before = CollectState.load(out).saved(query) if out.is_dir() else 0
        todo = max(0, max_num - before)
        with console.progress(todo, "collect", unit="img") as bar:
            report = collect(query, out, max_num=max_num, image_type=image_type, color=color, endpoint=endpoint,
                             min_side=min_size, delay=delay, workers=workers, timeout=timeout,
                             on_saved=bar.advance, log=console.warn)
        total = report.before + len(report.saved)
        msg = f"saved {len(report.saved)} new image(s) to {display_path(out)}/ ({total} of {max_num} for this query)"
        details = []
        if report.duplicates:
            details.append(f"{report.duplicates} duplicate(s) by content")
        if report.skipped_known:
            details.append(f"{report.skipped_known} URL(s) seen before")
        if report.failed:
            details.append(f"{report.failed} failed or not usable")
        if details:
            msg += "; " + ", ".join(details)
        if total < max_num:
            msg += f"; the search gave no more results after {report.pages} page(s)"
        console.out.print(msg, markup=False)
