"""``charfw templates``: look at the control images charfw makes for the angle codes.

``charfw templates draw openpose -o DIR`` writes an OpenPose skeleton for every code of
the workspace's angle sets (:mod:`charfw.generation.openpose`: a standing figure turned
and tilted as each code says), one folder per set, plus a contact sheet per set, so that
people can see what an openpose ControlNet will be asked to draw before generating.
"""

from __future__ import annotations

from pathlib import Path

import click

import charfw
from charfw import console
from charfw.build import atomic
from charfw.errors import CharfwError, check_module, display_path


@charfw.hookimpl
def register_commands(cli):
    @cli.group("templates")
    def templates() -> None:
        """The angle templates: draw the control images charfw generates with."""

    @templates.command("draw")
    @click.argument("kind", type=click.Choice(["openpose"]))
    @click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
                  help="Folder for the images (one sub-folder per angle set).")
    @click.option("--set", "sets", multiple=True, metavar="NAME",
                  help="Angle set(s) to draw (default: every set, e.g. face and body).")
    @click.option("--size", type=click.IntRange(64, 4096), default=512, show_default=True,
                  help="Side of each square image in pixels.")
    @click.option("--symmetric", is_flag=True,
                  help="Only the codes a symmetric character uses (horizontal 0-4).")
    @click.pass_context
    def draw(ctx: click.Context, kind: str, out: Path, sets: tuple[str, ...], size: int, symmetric: bool) -> None:
        """Draw a control image for every angle code: `charfw templates draw openpose -o DIR`."""
        from charfw.cli import workspace_from

        check_module("cv2", extra="generate", purpose="drawing OpenPose control images")
        from charfw.generation.openpose import draw_angle_set, write_set

        ws = workspace_from(ctx)
        available = ws.templates.angle_sets
        names = list(sets) or sorted(available)
        unknown = [n for n in names if n not in available]
        if unknown:
            raise CharfwError(f"no angle set named {', '.join(unknown)}; the sets are {', '.join(sorted(available))}")
        total = 0
        for name in names:
            images = draw_angle_set(available[name], size, symmetric=symmetric)
            folder = out / name
            write_set(images, folder)
            atomic.write_bytes(folder / "contact-sheet.png", _contact_sheet(images))
            total += len(images)
            console.info(f"{name}: {len(images)} {kind} images and contact-sheet.png in {display_path(folder)}/")
        console.info(f"wrote {total} image(s)")


def _contact_sheet(images: dict) -> bytes:
    """The images side by side in rows of eight, each labelled with its code."""
    import io

    from PIL import Image, ImageDraw

    cell = 160
    codes = list(images)
    columns = min(8, len(codes)) or 1
    rows = (len(codes) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * cell), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for n, code in enumerate(codes):
        x, y = (n % columns) * cell, (n // columns) * cell
        sheet.paste(images[code].convert("RGB").resize((cell - 4, cell - 4)), (x + 2, y + 2))
        draw.text((x + 6, y + 4), code, fill=(255, 255, 255))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()
