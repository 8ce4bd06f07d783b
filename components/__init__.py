"""ComponentResources of the personal-rag Pulumi program, one capability per module."""
