"""Artifacts on disk: manifests, content hashes, atomic stage directories and the typed hand-over records."""
