"""Redis: the only package that knows keys (``keys``) and scripts (``scripts/*.lua``)."""
