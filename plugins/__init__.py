"""charfw's built-in plugins, one folder per stage kind.

They are ordinary plugins: each module registers its components through the same
``@charfw.hookimpl`` hooks a third-party plugin uses, and the engine never refers to them
by name. Every module here whose name does not start with ``_`` is loaded as a plugin
(``charfw.plugins.PluginSystem``); keep module-level imports light (no torch, diffusers
or onnxruntime at import time) so ``charfw --help`` stays fast.
"""
