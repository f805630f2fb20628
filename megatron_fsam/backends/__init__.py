"""Adapters from a training framework's optimizer layout to SAM shards."""
