"""An S3-compatible object store on 127.0.0.1 for the tests: moto's server (``moto[server]`` from the
test extra), a bucket in it, and the environment that points boto3/s3fs (and so an ``s3://`` result
storage) at it. Started as a process and stopped by its PID.

    >>> s3 = MotoS3(log_path).start()          # doctest: +SKIP
    >>> s3.env["AWS_ENDPOINT_URL"]             # doctest: +SKIP
    'http://127.0.0.1:39871'
    >>> s3.stop()                              # doctest: +SKIP
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flows.prefect_server import HOST, free_port, stop_by_pid

BUCKET = "gemma-lora-results"


class MotoS3:
    def __init__(self, log_path: Path, bucket: str = BUCKET):
        self.log_path, self.bucket = Path(log_path), bucket
        self.port = free_port()
        self.endpoint = f"http://{HOST}:{self.port}"
        self.process: subprocess.Popen | None = None
        # moto accepts any credentials; botocore >= 1.31 and s3fs read the endpoint from the environment
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def start(self, timeout: float = 60) -> "MotoS3":
        exe = Path(sys.executable).parent / "moto_server"
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen([str(exe), "-H", HOST, "-p", str(self.port)], stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto's S3 server did not start; see {self.log_path}")
                time.sleep(0.2)
        # PUT /<bucket>: create the bucket (moto takes unsigned requests)
        request = urllib.request.Request(f"{self.endpoint}/{self.bucket}", method="PUT")
        urllib.request.urlopen(request, timeout=10).close()
        return self

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        keys, token = [], None
        while True:
            page = client.list_objects_v2(Bucket=self.bucket, Prefix=prefix,
                                          **({"ContinuationToken": token} if token else {}))
            keys += [item["Key"] for item in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not token:
                return keys

    def stop(self) -> int | None:
        if self.process is None:
            return None
        return stop_by_pid(self.process, ((signal.SIGTERM, 10), (signal.SIGKILL, 10)))
