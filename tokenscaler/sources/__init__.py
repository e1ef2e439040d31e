"""Metrics in: the MetricsSource protocol and its two implementations (Prometheus, the embedded scraper)."""
