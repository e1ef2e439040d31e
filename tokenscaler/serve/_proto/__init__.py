"""Generated KEDA external scaler stubs (from keda/externalscaler.proto); regenerate with ``make generate``.

Do not edit: ``tests/test_generated.py`` fails when these files differ from a fresh generation.
"""
