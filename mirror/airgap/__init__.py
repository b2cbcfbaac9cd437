"""Air-gapped sites: `mirror seed`, `mirror export` and `mirror import`, and what they share
(the OCI layout bundle format, the manifest walk, progress display)."""
