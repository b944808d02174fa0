"""charfw: character manifests in, character LoRAs out (face → body → group).

Plugins import ``hookimpl`` from here::

    import charfw

    @charfw.hookimpl
    def register_taggers(register):
        register(MyTagger())

The hooks are in :mod:`charfw.hookspecs`, the component base classes in
:mod:`charfw.components`.
"""

__version__ = "0.1.0"

from .hookspecs import hookimpl

__all__ = ["__version__", "hookimpl"]
