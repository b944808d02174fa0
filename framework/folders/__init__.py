"""Training folders outside a build: the kohya folder convention (``<repeats>_<name>``),
caption files, tag text and the kohya dataset config. What ``charfw tag``, ``charfw toml``
and ``charfw tags`` use, and what the dataset stage writes."""
