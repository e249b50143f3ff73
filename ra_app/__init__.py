"""RA review app: research assistants code flagged audio for a study.

``gunicorn "ra_app:create_app()"`` serves it; ``flask --app ra_app db upgrade``
creates its tables. The factory itself is ra_app.factory's.
"""

from ra_app.factory import create_app

__all__ = ["create_app"]
