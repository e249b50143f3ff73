"""Developer tools: the local stack, the demo, test speech and tiny models.

Not part of the pipeline's wheel (pyproject.toml includes only ``audio_pipeline``
and ``ra_app``), so no fleet host carries or imports them. ``make deps`` installs
this folder as its own small distribution (devtools/pyproject.toml), which gives
the developer's virtualenv the ``devstack`` command.
"""
