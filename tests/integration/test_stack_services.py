"""The local stack is made of real services that really check credentials."""

import psycopg
import pytest
import redis
from botocore.exceptions import ClientError

from audio_pipeline import s3_utils

pytestmark = pytest.mark.integration


def test_redis_requires_its_password(stack_env):
    port = int(stack_env["REDIS_PORT"])
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port, password="wrong").ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port).set("k", "v")
    assert redis.Redis(host="127.0.0.1", port=port, password=stack_env["REDIS_PASSWORD"]).ping()


def test_redis_supports_blmove(redis_client):
    redis_client.rpush("queue:x", "a", "b")
    assert redis_client.blmove("queue:x", "processing:w", 1, "LEFT", "RIGHT") == "a"
    assert redis_client.lrange("processing:w", 0, -1) == ["a"]


def test_postgres_refuses_a_wrong_password(stack_env):
    url = stack_env["DATABASE_URL"].replace("dev-ra-app", "not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(url, connect_timeout=5)


def test_s3_checks_signatures(stack_env, bucket):
    good = s3_utils.client_from_env(stack_env)
    good.put_object(Bucket=bucket, Key="k", Body=b"x")
    bad = s3_utils.client_from_env({**stack_env, "S3_SECRET_KEY": "wrong-secret"})
    with pytest.raises(ClientError) as err:
        bad.get_object(Bucket=bucket, Key="k")
    assert err.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "AccessDenied"}
    unknown = s3_utils.client_from_env({**stack_env, "S3_ACCESS_KEY": "nobody"})
    with pytest.raises(ClientError):
        unknown.list_objects_v2(Bucket=bucket)
