"""The attention backends, one per module; raylm.workers.attention_backends names them
and holds their interface."""
