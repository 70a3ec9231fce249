"""The inference server: one device-resident backbone, many domains chosen per request.

- `server.engine.Engine`: backbone + adapter bank (LRU over (domain, version) slots, single-flight loads,
  merged weights for single-domain batches); usable without HTTP.
- `server.batcher.Batcher`: dynamic batching of any domains on one worker thread, with backpressure.
- `server.app.create_app(settings)`: the FastAPI app (routes in `server.routes`, errors in
  `server.http_errors`, settings in `server.settings`, metrics in `server.metrics`).
- `server.client.MultidomainClient`: the Python client; `server.cli`: the `multidomain serve` command.
"""
