"""featuresteer: Python client SDK for the featuresteer gRPC service.

Sync (``Client``) and async (``AsyncClient``) clients with the same method names, one
exception type (``FeatureSteerError``: code + details), protobuf results with type stubs,
default deadlines, and gRPC-native retries of UNAVAILABLE for unary calls. Importing this
package never imports torch.
"""

from featuresteer.client import AsyncClient, Client, FeatureSteerError
from featuresteer.v1 import featuresteer_pb2 as pb

__all__ = ["AsyncClient", "Client", "FeatureSteerError", "pb"]
__version__ = "0.1.0"
