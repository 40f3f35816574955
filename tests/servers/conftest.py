from tests.models.fixtures import tiny, tiny_checkpoints, tiny_models

__all__ = ["tiny", "tiny_checkpoints", "tiny_models"]
