"""The build layer: manifests in, a plan of stages, incremental runs with records.

``workspace`` finds manifests and templates; ``manifest`` validates them; ``angles`` and
``template_library`` hold the angle sets and tables; ``items`` is the image record the
image stages pass on; ``stages`` is the stage table and the runner of each stage kind;
``plan``, ``records`` and ``run`` are the engine (``engine`` keeps the entry points);
``hashing`` and ``atomic`` are what makes rebuilds exact and writes safe.
"""
