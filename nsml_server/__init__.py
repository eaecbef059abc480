"""jupyter-nsml: NSML control plane (REST API, database owner, scheduler loop)."""

__version__ = "0.1.0"
