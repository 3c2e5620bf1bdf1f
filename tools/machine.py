"""Kept for tools that import ``machine`` directly (bench_convert); the facts live in benchlib.machine."""
from __future__ import annotations

from benchlib.machine import cpu_model, machine_facts, memory_gb

__all__ = ["cpu_model", "machine_facts", "memory_gb"]
