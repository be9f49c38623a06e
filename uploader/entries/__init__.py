"""Job bodies and their entries, opened safely beneath a root: manifests, directory walks, content types."""
