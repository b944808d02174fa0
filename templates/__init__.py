"""charfw's shipped templates: angle sets, tag rules, batch-size tables and jinja2 templates.

This folder is data. It is a package only so that it installs with charfw and can be
found with ``importlib``; see ``charfw.template_library`` for how it is looked up and how
a workspace's own ``templates/`` folder overrides it.
"""
