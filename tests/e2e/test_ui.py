"""The UIs people review runs in, in headless Chromium: MLflow's run pages and Airflow's trigger form.

All read what the REST-triggered Airflow run of the smoke profile produced (tests/e2e/conftest.py): its MLflow
evaluate run must show nDCG@10 at the operating point with the value the stage logged, its train run must chart
the loss curve, and the DAG's trigger form must show the run Params. Screenshots go to `test-artifacts/` (or $EMBEDFORGE_TEST_ARTIFACTS).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.airflow_server import DAG_ID, AirflowServer
from tests.helpers import REPO_ROOT, stage_run
from tests.servers import _server, free_port

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless Chromium on a machine with no outside network: no background connections, no sandbox (root in CI).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
UI_TIMEOUT_MS = 180_000  # a loaded 2-core CI machine renders these single-page apps slowly


@pytest.fixture(scope="module")
def screenshots() -> Path:
    folder = Path(os.environ.get("EMBEDFORGE_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "Debian's chromium is needed: apt-get install chromium (.ci/run does)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def mlflow_ui(store: str, workdir: Path) -> Iterator[str]:
    """`mlflow server` over an existing tracking store, on 127.0.0.1."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", store,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with _server(command, f"{url}/health", workdir / "mlflow_ui.log", env, timeout_s=300):
        yield url


def test_mlflow_run_page_shows_the_evaluate_runs_ndcg_at_10(airflow_server: AirflowServer,
                                                           triggered_run: dict[str, Any], browser: Any,
                                                           screenshots: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{airflow_server.project / 'mlflow.db'}"
    client = MlflowClient(store)
    evaluate = stage_run(client, "evaluate")
    logged = evaluate.data.metrics["operating_point/ndcg_at_10"]
    with mlflow_ui(store, tmp_path) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{url}/#/experiments/{evaluate.info.experiment_id}/runs/{evaluate.info.run_id}",
                  timeout=UI_TIMEOUT_MS)
        page.get_by_placeholder("Search metrics").fill("operating_point/ndcg")
        # the row with a cell reading exactly that name: not ood/<set>/operating_point/ndcg_at_10
        row = page.get_by_role("row").filter(has=page.get_by_text("operating_point/ndcg_at_10", exact=True))
        row.wait_for(timeout=UI_TIMEOUT_MS)
        row.scroll_into_view_if_needed()
        shown = row.inner_text()
        page.screenshot(path=str(screenshots / "mlflow_run.png"))
        page.close()
    assert float(shown.split()[-1]) == pytest.approx(logged, abs=1e-9)


def test_mlflow_draws_the_train_runs_loss_curve(airflow_server: AirflowServer, triggered_run: dict[str, Any],
                                               browser: Any, screenshots: Path, tmp_path: Path) -> None:
    """The trainer's loss, learning rate and dev nDCG@10 are metric histories: the run page charts them."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{airflow_server.project / 'mlflow.db'}"
    client = MlflowClient(store)
    train = stage_run(client, "train")
    losses = client.get_metric_history(train.info.run_id, "train/loss")
    assert len(losses) >= 2 and len({point.step for point in losses}) == len(losses)
    with mlflow_ui(store, tmp_path) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.goto(f"{url}/#/experiments/{train.info.experiment_id}/runs/{train.info.run_id}/model-metrics",
                  timeout=UI_TIMEOUT_MS)
        legend = page.get_by_text("train (train/loss)", exact=True).first  # the loss chart's legend: run (metric)
        legend.wait_for(timeout=UI_TIMEOUT_MS)
        legend.scroll_into_view_if_needed()
        page.screenshot(path=str(screenshots / "mlflow_train_curves.png"))
        page.close()


def test_airflow_trigger_form_shows_the_dags_params(airflow_server: AirflowServer, browser: Any,
                                                     screenshots: Path) -> None:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.add_cookies([{"name": "_token", "value": airflow_server.token, "url": airflow_server.url}])
    page = context.new_page()
    page.goto(f"{airflow_server.url}/dags/{DAG_ID}", timeout=UI_TIMEOUT_MS)
    page.get_by_role("button", name="Trigger").first.click(timeout=UI_TIMEOUT_MS)
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("curate.eps: ").wait_for(timeout=UI_TIMEOUT_MS)  # the Param's description names it
    shown = dialog.inner_text()
    page.screenshot(path=str(screenshots / "airflow_trigger_form.png"))
    context.close()
    params = airflow_server.api("GET", f"/dags/{DAG_ID}/details")["params"]
    assert set(params) >= {"profile", "eps", "epochs", "student_layers", "matryoshka_dims", "mode"}
    for name in params:
        assert name in shown, f"the trigger form does not show Param {name!r}"
