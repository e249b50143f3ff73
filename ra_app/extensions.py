"""Flask extensions, created unbound and wired to the app in create_app."""

from __future__ import annotations

from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from flask_wtf.csrf import CSRFProtect

# No reload of every touched object after each commit (a SELECT per object on next
# access): a request's objects stay as it wrote them. Code that changes ORM rows with
# plain SQL expires them itself (assignment.expire_abandoned, lock_for_label).
db = SQLAlchemy(session_options={"expire_on_commit": False})
migrate = Migrate()
login_manager = LoginManager()
csrf = CSRFProtect()
# No default limits: only the login form is limited (see views/auth.py).
limiter = Limiter(key_func=get_remote_address)
