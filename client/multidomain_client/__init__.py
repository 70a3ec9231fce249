"""Python client for the multidomain server's HTTP API: ``pip install ./client`` (httpx only, no torch).

    from multidomain_client import MultidomainClient
    with MultidomainClient("http://127.0.0.1:8000", token="admin-secret") as client:
        client.classify("birds", open("crow.jpg", "rb").read(), top_k=3)

Every failure raises a ``ClientError``: ``ServerUnreachable`` or a ``ServerResponseError`` subclass whose
text carries the server's reasons.
"""

from multidomain_client.client import (
    AuthError,
    ClientError,
    InvalidArtifact,
    MultidomainClient,
    NotFound,
    Overloaded,
    ServerResponseError,
    ServerUnreachable,
)

__all__ = [
    "AuthError",
    "ClientError",
    "InvalidArtifact",
    "MultidomainClient",
    "NotFound",
    "Overloaded",
    "ServerResponseError",
    "ServerUnreachable",
]
