"""NSMLSpawner: per-user notebook servers in containers on the NSML cluster."""

from .spawner import NSMLSpawner

__all__ = ["NSMLSpawner"]
