"""Throughput and memory benchmarks of fused_attn against the attention a user would otherwise pick.

    python -m bench --help
"""
