"""Blueprints: auth, queue (the RA's home), review, admin, api."""
