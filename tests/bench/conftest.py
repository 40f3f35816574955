from tests.models.fixtures import tiny_checkpoints

__all__ = ["tiny_checkpoints"]
