"""The bottom layer: what every folder may import and which imports nothing else of tokensel.

- ``errors``: :class:`TokenselError`, the one base class of user mistakes.
- ``registry``: :class:`Registry`, the one way to pick a thing by name.
- ``cli``: the one way an entry point parses its arguments and reports a user mistake.
- ``hub``: local paths, hub downloads and offline failures, shared by encoders and VLM backends.
- ``precision``: the dtype table behind every ``precision`` key.
- ``open_clip_configs``: tokensel's own open_clip model configs (e.g. ``coca_tiny``).
"""
