"""Helpers for testing the worker runtime with real subprocesses."""
