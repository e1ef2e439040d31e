"""Generated KEDA external scaler stubs; regenerate with ``python -m tokenscaler.serve.protos``.

Do not edit: ``tests/serve/test_protos.py`` fails when these files differ from a fresh generation.
"""
