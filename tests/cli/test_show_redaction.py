"""`ckptd show` hides credentials: values of secret-looking variables, and
passwords inside URLs anywhere in the environment or the command.

Found: `show` hid AWS_SECRET_ACCESS_KEY but printed
DATABASE_URL=postgres://u:pw@h/db in full.
"""

from __future__ import annotations

import json
from pathlib import Path

from helpers import ckptd, env_for, run_script

SECRETS = ["hunter2pw", "redispass9", "sigvalue77", "tok3nvalue"]


def test_show_hides_passwords_inside_urls(home: Path) -> None:
    env = env_for(home, DATABASE_URL="postgres://alice:hunter2pw@db.internal:5432/runs",
                  REDIS_URL="redis://:redispass9@cache:6379/0",
                  DATA_URL="https://bucket.s3/x?X-Amz-Signature=sigvalue77&part=1",
                  PLAIN_URL="https://example.com/a@b")
    out = run_script(home, """
import ckptd_client as ckptd
run = ckptd.init(name="redact")
print("run", run.id)
run.finish()
""", env=env, args=["--db", "mysql://bob:tok3nvalue@h/db"])
    run_id = out.stdout.split("run ")[-1].strip()
    shown = json.loads(ckptd(home, "show", run_id, "--json", check=True).stdout)
    text = ckptd(home, "show", run_id, check=True).stdout + json.dumps(shown)
    for secret in SECRETS:
        assert secret not in text, secret
    assert shown["env"]["DATABASE_URL"] == "postgres://alice:***@db.internal:5432/runs"
    assert shown["env"]["REDIS_URL"] == "redis://:***@cache:6379/0"
    assert shown["env"]["DATA_URL"] == "https://bucket.s3/x?X-Amz-Signature=***&part=1"
    assert shown["env"]["PLAIN_URL"] == "https://example.com/a@b"
    assert "mysql://bob:***@h/db" in shown["command"]
