"""Tooling on top of the library: the benchmark sweep, the demo, model shapes and the helpers they share.

Imports `hf_kvplug`, never imported by it: the core (cache, attention, patcher, ops, reference, config) reads
without this folder. The command line (`hf_kvplug/cli.py`) is the one entry point into it.
"""
