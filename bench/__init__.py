"""Benchmarks for cnnserve: training throughput and API latency."""
