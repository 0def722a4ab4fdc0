"""The HTTP-facing services: one contract (`base.py`), the probe, classify and intervene
services, and every request / response model of their endpoints (`schemas.py`).

Nothing outside this package (and the CLI, and the handlers above it) imports it: the library
below knows nothing of serving, and nothing here knows TorchServe (handlers/ts_adapter.py does).
"""
