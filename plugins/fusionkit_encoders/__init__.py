"""fusionkit_encoders plugin package."""
