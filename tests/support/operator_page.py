"""The RA app's operator page under test: the pipeline's Redis reached as the fleet
reaches it, through an ACL user with exactly the rules roles/orchestrator gives it.

The rules are read from the role's defaults, so the page's code and the ACL cannot
drift: a command or key the page needs and the role does not grant fails here.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import redis
import yaml

from audio_pipeline.queue import JobQueue, RetryPolicy

REPO = Path(__file__).resolve().parents[2]
ROLE_DEFAULTS = REPO / "roles" / "orchestrator" / "defaults" / "main.yml"


def operator_acl_rules() -> list[str]:
    """The operator user's ACL rules as redis.conf.j2 writes them (plain, no template)."""
    rules = yaml.safe_load(ROLE_DEFAULTS.read_text())["orchestrator_ra_operator_redis_acl"]
    assert "{" not in rules, "the ACL rules are expected to be plain text"
    return str(rules).split()


@contextmanager
def operator_redis_user(admin: redis.Redis, db: int) -> Iterator[str]:
    """A Redis ACL user of the role's rules, uniquely named and removed afterwards;
    yields its URL for OPERATOR_REDIS_URL (database ``db``)."""
    name = f"ra-operator-test-{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(12)
    admin.execute_command(
        "ACL", "SETUSER", name, "reset", "on", f">{password}", *operator_acl_rules()
    )
    kwargs = admin.connection_pool.connection_kwargs
    try:
        yield (
            f"redis://{quote(name, safe='')}:{quote(password, safe='')}@"
            f"{kwargs.get('host', '127.0.0.1')}:{kwargs['port']}/{db}"
        )
    finally:
        admin.execute_command("ACL", "DELUSER", name)


def dead_letter(
    r: redis.Redis, stage: str, queue: str, payload: dict[str, object], attempts: int = 0
) -> None:
    """A real dead letter through the queue library, as a worker's last failure makes it."""
    q = JobQueue(r, f"{stage}:testhost:1", stage, retry_policy=RetryPolicy(max_attempts=1))
    body = dict(payload)
    if attempts:
        body["_attempts"] = attempts
    r.rpush(queue, json.dumps(body))
    job = q.claim([queue], timeout=0)
    assert job is not None
    q.retry(job, RuntimeError(f"{stage} broke"))
