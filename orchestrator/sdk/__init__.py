"""The Python client's earlier home: a re-export of ``atelier_client`` (``clients/python/``)."""
