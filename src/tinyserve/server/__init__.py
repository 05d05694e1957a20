"""The OpenAI-compatible HTTP server: FastAPI routes, pydantic models of the OpenAI schema, SSE
streaming, OpenAI-shaped errors and Prometheus metrics. JSON, chat templates and SSE never leave
this package; the engine is reached only through `tinyserve.engine.async_engine.AsyncEngine`.

Entry points: `create_app(state)` (app.py), `tinyserve serve` (cli.py), `tinyserve bench serve`
(bench.py).
"""
