"""fusionkit_rjca plugin package."""
