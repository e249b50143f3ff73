"""The study's codebook, loaded once at start-up so a bad file stops the app early."""

from __future__ import annotations

from flask import Flask, current_app

from ra_app.codebook import Codebook, load_codebook


def init_app(app: Flask) -> None:
    # CodebookError names every bad entry; letting it propagate fails start-up loudly.
    app.extensions["ra_codebook"] = load_codebook(app.config["CODEBOOK_PATH"])


def get_codebook() -> Codebook:
    return current_app.extensions["ra_codebook"]
