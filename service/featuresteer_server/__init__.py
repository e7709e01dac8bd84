"""featuresteer_server: the gRPC service that decodes, steers and attributes a language model
through sparse dictionaries. Heavy imports (torch, transformers) stay inside submodules."""

__version__ = "0.1.0"
