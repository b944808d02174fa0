"""The build report: ``build/<target>/report.html`` per character or group, ``build/index.html``.

The page shows, per part, what a character LoRA is judged by: the angle sheet of the
prepared images with their captions, the lint findings, the dataset, the training curves
and samples, ‖ΔW‖ per block around the block merge and the compression, the ``sample``
stage's grid, and every stage's timing and whether it was reused. It is written at the end
of every build (the built-in ``report`` plugin's ``build_finished`` hook) and by
``charfw report``; it reads only what the stages left in ``build/``, so it can be written
again at any time. Thumbnails and charts sit beside it in ``build/<target>/.report/``
(:mod:`.store`), so the page works offline and without a server.

=====================  ================================================================
module                 what it holds
=====================  ================================================================
:mod:`.page`           :func:`write_reports`, :func:`write_report`, :func:`write_index`
:mod:`.collect`        each part's sections, read from records and files
:mod:`.charts`         the matplotlib charts (SVG)
:mod:`.store`          ``.report/``: thumbnails, charts and cached facts, by their inputs
=====================  ================================================================
"""

from __future__ import annotations

from charfw.report.page import INDEX_NAME, REPORT_NAME, write_index, write_report, write_reports

__all__ = ["INDEX_NAME", "REPORT_NAME", "write_index", "write_report", "write_reports"]
