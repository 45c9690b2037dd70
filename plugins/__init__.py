"""autoshrink's built-in plugins: models, datasets and techniques.

Each module is an ordinary plugin, registered through the ``autoshrink`` entry-point group exactly
as a third-party package would be (see pyproject.toml).
"""
