"""Train stage."""
