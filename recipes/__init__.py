"""The recipes shipped with fusionkit (installed as the ``fusionkit.recipes`` package data).

List them with ``fusionkit recipe list``; copy one to edit with ``fusionkit recipe copy``.
"""
