"""The contract: errors, component interfaces, the plugin hook and registry, the recipe schema.

Nothing here runs a model; everything else in fusionkit builds on it.
"""
