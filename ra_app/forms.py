"""WTForms for the fixed forms (the label form is built from the codebook)."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import IntegerField, PasswordField, SelectField, StringField
from wtforms.validators import DataRequired, EqualTo, Length, NumberRange

from ra_app.models import Role
from ra_app.security import MIN_PASSWORD_LENGTH


class LoginForm(FlaskForm):
    username = StringField("Username", validators=[DataRequired(), Length(max=64)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=1024)])


class NewUserForm(FlaskForm):
    username = StringField("Username", validators=[DataRequired(), Length(min=2, max=64)])
    password = PasswordField(
        "Initial password", validators=[DataRequired(), Length(min=MIN_PASSWORD_LENGTH, max=1024)]
    )
    role = SelectField("Role", choices=[r.value for r in Role], default=Role.RA.value)


class ResetPasswordForm(FlaskForm):
    password = PasswordField(
        "New password",
        validators=[
            DataRequired(),
            Length(
                min=MIN_PASSWORD_LENGTH,
                max=1024,
                message=f"The password must be {MIN_PASSWORD_LENGTH} to 1024 characters long.",
            ),
        ],
    )
    confirm = PasswordField(
        "Repeat it", validators=[DataRequired(), EqualTo("password", "The passwords differ.")]
    )


class AssignBatchForm(FlaskForm):
    batch_id = StringField("Batch", validators=[DataRequired(), Length(max=128)])
    username = StringField("Research assistant", validators=[DataRequired(), Length(max=64)])


class TokenForm(FlaskForm):
    name = StringField("Token name", default="script", validators=[DataRequired(), Length(max=64)])
    days = IntegerField("Valid for (days)", default=30, validators=[NumberRange(1, 365)])


class ActionForm(FlaskForm):
    """A bare POST (skip, deactivate, sync): only the CSRF token."""
