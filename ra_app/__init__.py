"""RA review app: research assistants code flagged audio for a study.

``gunicorn "ra_app:create_app()"`` serves it; ``flask --app ra_app db upgrade``
creates its tables. The factory lives in ra_app.factory so that code which finds
this package as a namespace (pytest puts tests/ on sys.path, and tests/ra_app/
shares the name) can still import it as ``ra_app.factory.create_app``.
"""

from ra_app.factory import create_app

__all__ = ["create_app"]
