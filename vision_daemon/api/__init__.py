"""The FastAPI control plane: small routers, one area each, over the `Control` facade.

The routers never import the core (pipeline, streams, workers) or the ingests: they read the
latest snapshot and call the facade's methods (an import-linter contract keeps it so).
"""

from vision_daemon.api.app import create_app
from vision_daemon.api.control import Control

__all__ = ["Control", "create_app"]
