"""Sweeps on real Ray: an embedded Ray shared by the in-process tests, the CLI in subprocesses
(Ctrl-C and resume), and a real one-node cluster started with ``ray start --head``. Every trial
is a real replay of the engine over three days of the shared NQ file."""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import io
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.conftest import NQ, ROOT
from trader.config import load_settings
from trader.errors import ConfigError
from trader.replay import replay
from trader.research.ray_runtime import RayRuntime, connect
from trader.research.space import WORST_OBJECTIVE, trial_key
from trader.research.sweep import SweepError, SweepRequest, run_sweep

pytestmark = pytest.mark.slow

FROM, TO = "2023-11-27T00:00", "2023-11-30T00:00"  # three sessions, 4,140 bars
METRICS = ("net_pnl", "sharpe", "sortino", "max_drawdown", "trades", "win_rate", "profit_factor")
TRADER = str(ROOT / ".venv" / "bin" / "trader")
RAY = str(ROOT / ".venv" / "bin" / "ray")

GRID = """
[params."execution.stop_atr_mult"]
grid = [1.5, 3.0]
[params."risk.max_consecutive_losses"]
grid = [1, 4]
"""


@pytest.fixture(autouse=True)
def bounded() -> Iterator[None]:
    """No test here may hang the suite: dump every thread's stack and exit after 10 minutes."""
    faulthandler.dump_traceback_later(600, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def ray_local() -> Iterator[RayRuntime]:
    """One embedded Ray (2 CPUs) for the in-process sweeps of this module, shut down at its end."""
    runtime = connect(None, 2)
    try:
        yield runtime
    finally:
        runtime.close()


def write(tmp_path: Path, text: str, name: str = "space.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def request(tmp_path: Path, space: Path, **kw: Any) -> SweepRequest:
    return SweepRequest(
        space=space, data=[NQ], date_from=FROM, date_to=TO, workers=2, root=tmp_path / "sweeps", **kw
    )


def direct_replay(
    tmp_path: Path, params: dict[str, Any], overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The same trial without Ray or the sweep code: settings built by hand, one replay."""
    nested: dict[str, Any] = {
        "advisor": {"mode": "off"},
        "data": {"paths": [str(NQ)], "start": FROM, "end": TO},
    }
    for layer in (overrides or {}, params):
        for key, value in layer.items():
            section, name = key.split(".")
            nested.setdefault(section, {})[name] = value
    journal = tmp_path / f"direct-{secrets.token_hex(4)}.sqlite"
    return replay(load_settings(None, nested), journal_path=journal).report


def journal_runs(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as db:
        return list(db.execute("SELECT run_id, status FROM runs ORDER BY started_at"))


def same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def test_a_grid_sweep_records_each_trial_with_the_metrics_of_a_direct_replay(
    tmp_path: Path, ray_local: RayRuntime
) -> None:
    out = io.StringIO()
    outcome = run_sweep(request(tmp_path, write(tmp_path, GRID), sweep_id="grid"), runtime=ray_local, out=out)
    assert (outcome.planned, outcome.ok, outcome.failed, outcome.interrupted) == (4, 4, 0, False)

    table = pl.read_parquet(outcome.results_path)
    assert table.height == 4
    assert set(table["status"]) == {"ok"}
    assert set(table["sweep_id"]) == {"grid"}
    assert {"execution.stop_atr_mult", "risk.max_consecutive_losses", *METRICS} <= set(table.columns)
    rows = table.to_dicts()
    assert {(r["execution.stop_atr_mult"], r["risk.max_consecutive_losses"]) for r in rows} == {
        (1.5, 1),
        (1.5, 4),
        (3.0, 1),
        (3.0, 4),
    }
    assert len({(r["net_pnl"], r["trades"]) for r in rows}) > 1  # the parameters reached the engine
    for r in rows:
        params = {"execution.stop_atr_mult": r["execution.stop_atr_mult"]}
        params["risk.max_consecutive_losses"] = r["risk.max_consecutive_losses"]
        assert r["trial_key"] == trial_key(params)
        expected = direct_replay(tmp_path, params)
        for m in METRICS:
            assert same(r[m], expected[m]), (params, m, r[m], expected[m])
        journal = outcome.sweep_dir / "trials" / f"{r['trial_key']}.sqlite"
        assert r["journal"] == str(journal)
        assert journal_runs(journal) == [(r["run_id"], "completed")]
    page = outcome.sweep_dir / "sweep.html"
    html = page.read_text()
    assert "parcoords" in html and "execution.stop_atr_mult" in html
    assert "<script src=" not in html and len(html) > 1_000_000  # plotly.js inline: self-contained
    assert "top 4 by sharpe" in out.getvalue()

    # the same sweep id again: every point is done, nothing runs, the rows stay as they were
    again = run_sweep(
        request(tmp_path, write(tmp_path, GRID), sweep_id="grid"), runtime=ray_local, out=io.StringIO()
    )
    assert (again.planned, again.skipped, again.ok, again.failed) == (4, 4, 0, 0)
    assert (
        pl.read_parquet(again.results_path).sort("trial_key")["run_id"].to_list()
        == table.sort("trial_key")["run_id"].to_list()
    )


def test_an_optuna_sweep_runs_its_trials_in_the_space_and_a_rerun_adds_new_points(
    tmp_path: Path, ray_local: RayRuntime
) -> None:
    space = write(
        tmp_path,
        'metric = "net_pnl"\n'
        '[params."execution.stop_atr_mult"]\nuniform = [1.0, 3.0]\n'
        '[params."risk.max_consecutive_losses"]\nint = [1, 5]\n'
        '[params."execution.trail_mode"]\nchoice = ["atr", "ticks"]\n',
    )
    first = run_sweep(
        request(tmp_path, space, sweep_id="opt", search="optuna", trials=4),
        runtime=ray_local,
        out=io.StringIO(),
    )
    assert (first.ok, first.failed, first.interrupted) == (4, 0, False)
    table = pl.read_parquet(first.results_path)
    assert table.height == 4 and set(table["status"]) == {"ok"}
    for r in table.to_dicts():
        assert 1.0 <= r["execution.stop_atr_mult"] <= 3.0
        assert r["risk.max_consecutive_losses"] in range(1, 6)
        assert r["execution.trail_mode"] in ("atr", "ticks")
        assert r["objective"] == r["net_pnl"]  # net P&L is always defined
        # the point Optuna proposed is the one the trial's replay ran with (its journaled config)
        with sqlite3.connect(r["journal"]) as db:
            (config,) = db.execute("SELECT config_json FROM runs").fetchone()
        ran = json.loads(config)
        assert ran["execution"]["stop_atr_mult"] == r["execution.stop_atr_mult"]
        assert ran["risk"]["max_consecutive_losses"] == r["risk.max_consecutive_losses"]
        assert ran["execution"]["trail_mode"] == r["execution.trail_mode"]
    assert table["trial_key"].n_unique() == 4  # four different points
    best = max(table.to_dicts(), key=lambda r: r["net_pnl"])
    assert first.best is not None and first.best["trial_key"] == best["trial_key"]

    second = run_sweep(
        request(tmp_path, space, sweep_id="opt", search="optuna", trials=6),
        runtime=ray_local,
        out=io.StringIO(),
    )
    assert (second.skipped, second.ok) == (4, 2)
    after = pl.read_parquet(second.results_path)
    assert after.height == 6  # two new points, the first four kept as they were
    assert (
        after.filter(pl.col("trial_key").is_in(table["trial_key"].to_list()))
        .sort("trial_key")["run_id"]
        .to_list()
        == table.sort("trial_key")["run_id"].to_list()
    )


def test_a_trial_the_config_refuses_is_recorded_as_failed_and_the_others_run(
    tmp_path: Path, ray_local: RayRuntime
) -> None:
    space = write(
        tmp_path,
        '[params."risk.max_contracts"]\ngrid = [2, 1]\n[params."execution.order_qty"]\ngrid = [1, 2]\n',
    )
    outcome = run_sweep(request(tmp_path, space, sweep_id="fails"), runtime=ray_local, out=io.StringIO())
    assert (outcome.ok, outcome.failed, outcome.interrupted) == (3, 1, False)
    table = pl.read_parquet(outcome.results_path)
    failed = table.filter(pl.col("status") == "failed").to_dicts()
    assert len(failed) == 1
    bad = failed[0]
    assert (bad["risk.max_contracts"], bad["execution.order_qty"]) == (1, 2)
    assert "execution.order_qty: 2 exceeds risk.max_contracts (1)" in bad["error"]
    assert bad["error"].startswith("ConfigError")
    assert all(bad[m] is None for m in METRICS) and bad["run_id"] is None
    ok = table.filter(pl.col("status") == "ok")
    assert ok.height == 3 and ok["error"].null_count() == 3
    page = (outcome.sweep_dir / "sweep.html").read_text()
    assert "failed trials (1)" in page and "exceeds risk.max_contracts" in page

    # a rerun retries the failed point only (it fails again), the ok ones are not run again
    again = run_sweep(request(tmp_path, space, sweep_id="fails"), runtime=ray_local, out=io.StringIO())
    assert (again.planned, again.skipped, again.ok, again.failed) == (4, 3, 0, 1)


def test_a_trial_without_trades_keeps_its_undefined_sharpe_and_ranks_last(
    tmp_path: Path, ray_local: RayRuntime
) -> None:
    space = write(
        tmp_path, '[params."policy.path"]\nchoice = ["strategies.rules:Flat", "strategies.rules:EmaCross"]\n'
    )
    out = io.StringIO()
    outcome = run_sweep(request(tmp_path, space, sweep_id="flat"), runtime=ray_local, out=out)
    assert (outcome.ok, outcome.failed) == (2, 0)
    rows = {r["policy.path"]: r for r in pl.read_parquet(outcome.results_path).to_dicts()}
    flat, ema = rows["strategies.rules:Flat"], rows["strategies.rules:EmaCross"]
    assert (flat["trades"], flat["sharpe"], flat["win_rate"]) == (0, None, None)
    assert flat["objective"] == -WORST_OBJECTIVE
    assert ema["trades"] > 0 and ema["sharpe"] is not None and ema["objective"] == ema["sharpe"]
    assert outcome.best is not None and outcome.best["trial_key"] == ema["trial_key"]
    table = out.getvalue()
    assert table.index("strategies.rules:EmaCross") < table.index("strategies.rules:Flat")


def test_a_rerun_with_another_setup_is_refused(tmp_path: Path, ray_local: RayRuntime) -> None:
    space = write(tmp_path, '[params."execution.stop_atr_mult"]\ngrid = [2.0]\n')
    first = request(tmp_path, space, sweep_id="setup")
    run_sweep(first, runtime=ray_local, out=io.StringIO())
    shorter = dataclasses.replace(first, date_to="2023-11-29T00:00")
    with pytest.raises(SweepError, match=r"another setup \(data_end differ\)"):
        run_sweep(shorter, runtime=ray_local, out=io.StringIO())


def cli(*args: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [TRADER, "sweep", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        **kw,
    )


def test_a_bad_space_fails_at_start_before_ray_naming_key_and_file(tmp_path: Path) -> None:
    space = write(tmp_path, '[params."risk.max_consecutive_loses"]\ngrid = [2, 3]\n')
    proc = cli("--space", str(space), "--data", str(NQ), "--out", str(tmp_path / "sweeps"))
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "risk.max_consecutive_loses: unknown key" in stderr and str(space) in stderr
    assert not (tmp_path / "sweeps").exists() and stdout == ""


def test_ctrl_c_keeps_finished_trials_and_a_rerun_runs_only_the_rest(tmp_path: Path) -> None:
    space = write(
        tmp_path,
        '[params."execution.stop_atr_mult"]\ngrid = [1.5, 2.0, 3.0]\n'
        '[params."risk.max_consecutive_losses"]\ngrid = [1, 4]\n',
    )
    args = ["--space", str(space), "--data", str(NQ), "--from", FROM, "--to", TO, "--workers", "1"]
    args += ["--out", str(tmp_path / "sweeps"), "--sweep-id", "intr", "--progress", "plain"]
    proc = cli(*args)
    assert proc.stdout is not None
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("trial 1/6 ok"):
                proc.send_signal(signal.SIGINT)
                break
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(line.startswith("trial 1/6 ok") for line in seen), "".join(seen)
    assert proc.returncode == 130, stderr
    assert "sweep intr interrupted" in stderr and "rerun with --sweep-id intr" in stderr
    results = tmp_path / "sweeps" / "intr" / "results.parquet"
    first = pl.read_parquet(results)
    finished = dict(zip(first["trial_key"], first["run_id"], strict=True))
    assert 1 <= len(finished) < 6 and set(first["status"]) == {"ok"}
    assert f"{len(finished)} ok and 0 failed of 6 trials" in stderr

    rerun = cli(*args)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert f"{6 - len(finished)} trials to run, {len(finished)} already done" in stdout
    final = pl.read_parquet(results)
    assert final.height == 6 and set(final["status"]) == {"ok"}
    trials = tmp_path / "sweeps" / "intr" / "trials"
    assert len(list(trials.glob("*.sqlite"))) == 6
    for key, run_id in finished.items():  # not run again: one run in its journal, the same id
        assert journal_runs(trials / f"{key}.sqlite") == [(run_id, "completed")]
        assert final.filter(pl.col("trial_key") == key)["run_id"].item() == run_id
    for r in final.to_dicts():
        assert (r["run_id"], "completed") in journal_runs(Path(r["journal"]))


# -- a real one-node cluster ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``ray start --head --block`` in its own session (so ending it ends only its processes),
    token authentication with a token of its own; skipped if it is not up within 60 s."""
    tmp = tmp_path_factory.mktemp("ray-cluster")
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    client_port = free_port()
    temp_dir = Path("/tmp") / f"ray-sweep-{secrets.token_hex(3)}"  # Ray's socket paths must stay short
    cmd = [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--disable-usage-stats"]
    cmd += ["--include-dashboard=false", f"--temp-dir={temp_dir}", "--object-store-memory=200000000"]
    try:
        import grpc  # noqa: F401 - Ray Client's server needs it

        cmd.append(f"--ray-client-server-port={client_port}")
        has_client = True
    except ImportError:
        has_client = False
    log = (tmp / "ray-start.log").open("w")
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        up = False
        while time.monotonic() < deadline and head.poll() is None:
            status = subprocess.run(
                [RAY, "status", f"--address=127.0.0.1:{port}"],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            if status.returncode == 0 and "2.0 CPU" in status.stdout:
                up = True
                break
            time.sleep(2)
        if not up:
            pytest.fail(
                f"ray start --head did not come up in 60 s: {(tmp / 'ray-start.log').read_text()[-500:]}"
            )
        yield {
            "address": f"127.0.0.1:{port}",
            "client": f"ray://127.0.0.1:{client_port}" if has_client else None,
            "env": env,
        }
    finally:
        head.send_signal(signal.SIGTERM)  # --block: ray start stops what it started
        try:
            head.wait(timeout=45)
        except subprocess.TimeoutExpired:
            head.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(head.pid, signal.SIGKILL)  # anything of its session left behind
        log.close()


def sweep_on_cluster(tmp_path: Path, cluster: dict[str, Any], address: str, sweep_id: str) -> pl.DataFrame:
    args = ["--space", str(write(tmp_path, GRID)), "--data", str(NQ), "--from", FROM, "--to", TO]
    args += [
        "--address",
        address,
        "--out",
        str(tmp_path / "sweeps"),
        "--sweep-id",
        sweep_id,
        "--progress",
        "plain",
    ]
    proc = cli(*args, env=cluster["env"])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "4 ok, 0 failed this run" in stdout
    return pl.read_parquet(tmp_path / "sweeps" / sweep_id / "results.parquet")


def test_a_sweep_runs_on_a_ray_cluster_by_its_gcs_address(
    tmp_path: Path, ray_cluster: dict[str, Any]
) -> None:
    table = sweep_on_cluster(tmp_path, ray_cluster, ray_cluster["address"], "cluster")
    assert table.height == 4 and set(table["status"]) == {"ok"}
    assert set(table["node"]) == {socket.gethostname()}
    row = table.filter(
        (pl.col("execution.stop_atr_mult") == 3.0) & (pl.col("risk.max_consecutive_losses") == 1)
    )
    expected = direct_replay(tmp_path, {"execution.stop_atr_mult": 3.0, "risk.max_consecutive_losses": 1})
    assert all(same(row[m].item(), expected[m]) for m in METRICS)
    for r in table.to_dicts():
        assert journal_runs(Path(r["journal"])) == [(r["run_id"], "completed")]


def test_a_sweep_runs_through_ray_client(tmp_path: Path, ray_cluster: dict[str, Any]) -> None:
    if ray_cluster["client"] is None:
        pytest.fail("Ray Client needs grpcio: the research extra installs ray[client]")
    table = sweep_on_cluster(tmp_path, ray_cluster, ray_cluster["client"], "client")
    assert table.height == 4 and set(table["status"]) == {"ok"}


def test_joining_a_cluster_without_its_token_fails_clearly(
    tmp_path: Path, ray_cluster: dict[str, Any]
) -> None:
    env = {k: v for k, v in ray_cluster["env"].items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    args = ["--space", str(write(tmp_path, GRID)), "--data", str(NQ), "--address", ray_cluster["address"]]
    args += ["--out", str(tmp_path / "sweeps")]
    proc = cli(*args, env=env)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 2
    assert f"cannot reach the Ray cluster at {ray_cluster['address']}" in stderr
    assert "RAY_AUTH_MODE=token" in stderr


def test_sweep_config_errors_name_the_space_file_in_process(tmp_path: Path) -> None:
    space = write(tmp_path, '[params."fusion.llm_weight"]\ngrid = [0.2, 1.7]\n')
    with pytest.raises(ConfigError, match=r"1\.7 is not within \[0, 1\]") as err:
        run_sweep(request(tmp_path, space))
    assert str(space) in str(err.value)
    assert not (tmp_path / "sweeps").exists()


def test_a_rerun_after_the_policy_was_retrained_at_the_same_path_is_refused(
    tmp_path: Path, ray_local: RayRuntime
) -> None:
    from tests.conftest import write_policy

    policy = write_policy(tmp_path / "policy.onnx", seed=1)
    config = write(tmp_path, f'[policy]\npath = "{policy}"\n', name="trader.toml")
    space = write(tmp_path, '[params."execution.stop_atr_mult"]\ngrid = [2.0]\n')
    first = request(tmp_path, space, sweep_id="retrained", config=config)
    run_sweep(first, runtime=ray_local, out=io.StringIO())
    write_policy(policy, seed=2)  # retrained in place
    with pytest.raises(SweepError, match=r"another setup \(policy_sha256 differ\)"):
        run_sweep(first, runtime=ray_local, out=io.StringIO())
