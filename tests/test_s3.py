"""kgrad against S3-compatible object storage: moto's S3 server on loopback, s3fs, zarr's FsspecStore.

A points group (``points`` + ``weights``) is written to ``s3://kgrad-test/points.zarr``; kgrad reads it
and writes ``s3://kgrad-test/<name>.zarr`` from the workers of a 1-worker local cluster; the output is read
back with ``xarray.open_zarr(..., storage_options=...)`` and compared with the in-process
:func:`pipeline.kernel_gradients` (float64).  Three ways of giving the credentials and endpoint are tried:
``RunConfig.storage_options`` (Python), ``[inputs] storage_options`` in a workflow file (``kgrad run``), and
the standard AWS environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) with no options
(`kgrad plan`: reads and checks the inputs, starts no cluster).

Skipped when moto's server or s3fs is not installed (``pip install -e '.[test]'``: moto[s3], flask, flask-cors, s3fs).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")  # moto.server needs flask and flask-cors
pytest.importorskip("flask")
xr = pytest.importorskip("xarray")

REPO = Path(__file__).resolve().parents[1]
BUCKET = "kgrad-test"
KEY = SECRET = "testing"
N, M, DIM, LENGTHSCALE = 250, 180, 2, 0.8
TILE_ROWS, ROWS_PER_TASK = 64, 128  # 2 tasks

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 (its own session, stopped as a group); yields its URL."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited ({proc.returncode}): {log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"moto server not listening on {url} after 30 s") from None
                time.sleep(0.1)
        yield url
    finally:
        _stop(proc)


def options(url: str) -> dict:
    """fsspec/s3fs storage options for the test server (s3fs takes ``endpoint_url`` directly too)."""
    return {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": url}}


@pytest.fixture(scope="module")
def data(endpoint):
    """The inputs on S3, and the in-process answer."""
    import zarr
    from zarr.storage import FsspecStore

    from pipeline import kernel_gradients

    fs = s3fs.S3FileSystem(**options(endpoint))
    fs.mkdir(BUCKET)
    rng = np.random.default_rng(11)
    points = rng.normal(size=(N, DIM))
    sources_weights = rng.uniform(0.5, 1.5, size=N)
    store = FsspecStore.from_url(f"s3://{BUCKET}/points.zarr", storage_options=options(endpoint))
    group = zarr.open_group(store=store, mode="w")
    group.create_array("points", data=points, chunks=(100, DIM))  # ragged chunks on purpose
    group.create_array("weights", data=sources_weights, chunks=(100,))
    fs.invalidate_cache()
    assert fs.exists(f"{BUCKET}/points.zarr/points/zarr.json")
    g, v = kernel_gradients(points, weights=sources_weights, lengthscale=LENGTHSCALE, dtype="float64",
                            return_value=True)
    return {"fs": fs, "points": f"s3://{BUCKET}/points.zarr", "gradient": g, "value": v}


def _check(url: str, out: str, data) -> None:
    with xr.open_zarr(out, storage_options=options(url)) as ds:
        assert ds.attrs["complete"] is True
        assert ds.attrs["inputs"]["weights"]["location"].startswith(data["points"])  # the group's weights
        assert ds["gradient"].dims == ("point", "dim")
        np.testing.assert_allclose(ds["gradient"].values, data["gradient"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ds["value"].values, data["value"], rtol=1e-12, atol=1e-12)


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):  # nothing of the user's own
        env.pop(name, None)
    env.update(extra)
    return env


@pytest.mark.slow  # S3 costs a moto server and a run: the default suite reads a missing input only
def test_run_workflow_s3_in_and_out(endpoint, data):
    from pipeline.workflow import RunConfig, run_workflow

    out = f"s3://{BUCKET}/out-api.zarr"
    attrs = run_workflow(RunConfig(points=data["points"], out=out, storage_options=options(endpoint),
                                   scheduler="local", workers=1, dtype="float64", lengthscale=LENGTHSCALE,
                                   tile_rows=TILE_ROWS, rows_per_task=ROWS_PER_TASK, progress=False))
    assert attrs["timings"]["tasks_run"] == 2
    _check(endpoint, out, data)
    # an existing remote output is refused without --overwrite / --resume, and left as it was
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="already exists"):
        run_workflow(RunConfig(points=data["points"], out=out, storage_options=options(endpoint),
                               workers=1, dtype="float64", lengthscale=LENGTHSCALE, progress=False))
    _check(endpoint, out, data)


@pytest.fixture(scope="module")
def cli_run(endpoint, data, tmp_path_factory):
    """`kgrad run WORKFLOW.toml` with ``[inputs] storage_options`` (the CLI has no flag for them): S3 in and out
    on a local cluster; (the output's URL, the finished process)."""
    out = f"s3://{BUCKET}/out-cli.zarr"
    workflow = tmp_path_factory.mktemp("s3-cli") / "s3.toml"
    workflow.write_text(
        "[inputs]\n"
        f'points = "{data["points"]}"\n'
        f'storage_options = {{key = "{KEY}", secret = "{SECRET}", '
        f'client_kwargs = {{endpoint_url = "{endpoint}"}}}}\n'
        "[kernel]\n"
        f"lengthscale = {LENGTHSCALE}\n"
        "[run]\n"
        f'out = "{out}"\n'
        'dtype = "float64"\n'
        f"workers = 1\ntile_rows = {TILE_ROWS}\nrows_per_task = {ROWS_PER_TASK}\n")
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", str(workflow), "--no-progress"],
                            capture_output=True, text=True, env=_env(), cwd=REPO, timeout=90)
    return out, result


@pytest.mark.slow
def test_cli_workflow_file_storage_options(endpoint, data, cli_run):
    out, result = cli_run
    assert result.returncode == 0, result.stderr
    _check(endpoint, out, data)


@pytest.mark.slow
def test_an_existing_remote_output_is_refused(endpoint, data, cli_run):
    """Without --overwrite / --resume an existing output on S3 is refused, and left as it was."""
    from pipeline.errors import InputError
    from pipeline.workflow import RunConfig, run_workflow

    out, result = cli_run
    assert result.returncode == 0, result.stderr
    with pytest.raises(InputError, match="already exists"):
        run_workflow(RunConfig(points=data["points"], out=out, storage_options=options(endpoint),
                               workers=1, dtype="float64", lengthscale=LENGTHSCALE, progress=False))
    _check(endpoint, out, data)


@pytest.mark.slow
def test_cli_plan_with_aws_environment_only(endpoint, data):
    """No storage options at all: s3fs/botocore take the endpoint and keys from the environment.

    `kgrad plan` reads and checks the inputs exactly as `kgrad run` does, without starting a cluster (the
    workers' side of S3 is covered by the two runs above; on a real cluster the same variables must be set
    in the workers' environment)."""
    env = _env(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET,
               AWS_DEFAULT_REGION="us-east-1")
    result = subprocess.run([sys.executable, "-m", "pipeline", "plan", "--points", data["points"],
                             "--out", f"s3://{BUCKET}/out-plan.zarr", "--workers", "1", "--dtype", "float64",
                             "--lengthscale", str(LENGTHSCALE), "--tile-rows", str(TILE_ROWS),
                             "--rows-per-task", str(ROWS_PER_TASK)],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=90)
    assert result.returncode == 0, result.stderr
    assert f"N={N} points x M={N} sources, D={DIM}" in result.stdout, result.stdout
    assert "out-plan.zarr: create" in result.stdout, result.stdout
    assert not data["fs"].exists(f"{BUCKET}/out-plan.zarr")  # plan writes nothing


@pytest.mark.slow
def test_no_credentials_is_a_one_line_error(endpoint, data):
    """Without credentials the bucket cannot be read: a one-line error and exit 2 (bad input), no traceback."""
    env = {k: v for k, v in _env().items() if not k.startswith("AWS_")}
    env.update({"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": endpoint})
    result = subprocess.run([sys.executable, "-m", "pipeline", "plan", "--points", data["points"],
                             "--out", f"s3://{BUCKET}/never.zarr"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=90)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_missing_remote_input_is_a_one_line_error(endpoint):
    from pipeline.errors import InputError
    from pipeline.workflow import RunConfig, prepare

    with pytest.raises(InputError, match="does not exist"):
        prepare(RunConfig(points=f"s3://{BUCKET}/nothing.zarr", out=f"s3://{BUCKET}/never.zarr",
                          storage_options=options(endpoint), workers=1))
    fs = s3fs.S3FileSystem(**options(endpoint))
    assert not fs.exists(f"{BUCKET}/never.zarr")
