"""The inference server: one device-resident backbone, many domains chosen per request.

- `server.engine.Engine`: backbone + adapter bank (LRU over (domain, version) slots, single-flight loads,
  merged weights for single-domain batches); usable without HTTP.
- `server.batcher.Batcher`: dynamic batching of any domains on one worker thread, with backpressure.
- `server.app.create_app(settings)`: the FastAPI app (routes in `server.routes`, errors in
  `server.http_errors`, settings in `server.settings`, metrics in `server.http_metrics` and
  `server.engine_metrics`); it reaches engines through one `server.engine_client.EngineClient`.
- `server.supervisor`: what `multidomain serve` runs — K front-end processes (`server.frontend_process`,
  no torch) and one engine process per device (`server.engine_process`, `server.engine_service`), talking
  msgpack over ZeroMQ (`server.protocol`) with pixels in shared memory (`server.shm`).
The Python client is its own package (`client/`, `multidomain_client`); the `multidomain serve` command
lives with the other commands (`multidomain/serve_cli.py`). This package imports neither `training` nor
`multidomain`.
"""

import os

# Before torch loads its OpenMP runtime (which reads this once): worker threads that sleep instead of
# spinning between parallel regions. With the event loop, decode threads and other processes sharing the
# cores, spinning threads collapse a forward pass (measured on the 2-core machine under load: a batch of
# 32 took 6.9 s spinning, 0.69 s passive). An operator's own OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
