"""The contract: errors, component interfaces, the plugin hook and registry, the recipe schema.

Nothing here runs a model; everything else in fusionkit builds on it.
"""

__version__ = "0.2.0"
