"""Readers: one per data domain, turning BPF map contents into plain snapshot data."""
