"""An OpenAI-compatible HTTP API over the chat engine: ``python -m lavis.serve --cfg-path RUN/config.yaml -c M.pth``.

``protocol`` holds the request schema (pydantic) and OpenAI-shaped errors, ``messages`` turns a request's messages
into engine turns, ``limits`` bounds each request before any expensive work (its docstring lists every limit),
``scheduler`` queues and batches requests for the one model, ``app`` is the FastAPI application and command line,
``bench`` measures throughput with the ``openai`` client.
"""
