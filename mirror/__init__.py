"""mirror: a streaming pull-through caching mirror for OCI container registries."""

__version__ = "0.1.0"
