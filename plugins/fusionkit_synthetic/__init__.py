"""fusionkit_synthetic plugin package."""
