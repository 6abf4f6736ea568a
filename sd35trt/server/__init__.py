"""HTTP serving (`pip install 'sd35trt[serve]'`): FastAPI + uvicorn over one Pipeline and its
micro-batcher. `sd35trt serve` runs it; `create_app` + `BackgroundServer` embed it in a service.

The runtime (`sd35trt.runtime`, including `runtime/batching.py`) needs none of this: it stays
importable without the `serve` extra.
"""

from .app import GENERATIONS, create_app
from .runner import BackgroundServer, bind, run
from .schema import GenerationRequest, Limits
from .state import ServeSettings

__all__ = ["GENERATIONS", "create_app", "BackgroundServer", "bind", "run", "GenerationRequest", "Limits",
           "ServeSettings"]
