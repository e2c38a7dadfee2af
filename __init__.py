"""tokensel: train and compare visual-token selectors for vision-language models.

The repository root is this package (``package-dir = {tokensel = "."}`` in pyproject.toml), so the
top-level folders import as ``tokensel.selectors``, ``tokensel.datamodules``,
``tokensel.callbacks`` and ``tokensel.experiments``.
"""

__version__ = "0.1.0"
