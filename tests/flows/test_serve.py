"""Operations end to end, as `make serve` / `make deploy` start them (flows/serve.py): a real Prefect server, process
worker and MLflow server on free loopback ports with prefect.yaml's deployments, shared by the tests of this module
(one start, one clean teardown, checked). A run triggered through the Prefect API (as the UI's Run button does)
logs to the MLflow server; then the two UIs in a real browser (Debian's chromium + chromedriver, driven by
selenium): the Prefect UI's custom-run form starts a run with one nested recipe field changed, and the MLflow UI
shows that run's comparison table and its student model.

Screenshots go to $COMPACTLM_SCREENSHOTS when set (`make screenshots` writes the README's docs/img/*.png), else to
the test's temporary directory."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows import serve
from tests.helpers import REPO, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DEPLOYMENT = "compress/tiny-test"
NEW_STEPS = 4  # distill.steps in the form: the deployment's default is 3
WAIT_UI = 60  # seconds for a page or an element to appear
WAIT_RUN = 900  # seconds for the flow run (1.5-2.5 min measured on 2 cores busy with other jobs)

try:
    import selenium  # noqa: F401

    _missing = []
except ImportError:
    _missing = ["the selenium package (pip install -e '.[dev]')"]
_missing += [f"{p} (apt-get install chromium chromium-driver; `make browser-deps`)"
             for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
pytestmark = pytest.mark.integration
needs_browser = pytest.mark.skipif(bool(_missing), reason="browser tests need " + ", ".join(_missing))


def _screenshot_dir(tmp: Path) -> Path:
    out = Path(os.environ.get("COMPACTLM_SCREENSHOTS") or tmp)
    out = out if out.is_absolute() else REPO / out
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """Prefect server, process worker and MLflow server (flows/serve.py) with prefect.yaml's deployments, for the
    whole module; the tiny-test deployment's defaults point at a temporary workdir, generate with HF (vLLM is tested
    elsewhere) and skip the speed benchmark, so its run takes a minute or two on 2 CPU cores. Teardown: `stop`
    leaves no service process and no state file behind."""
    import httpx

    state_dir = tmp_path_factory.mktemp("services") / "serve"
    state = serve.start(state_dir, free_port(), free_port())
    try:
        assert set(state["pids"]) == {"prefect-server", "mlflow-server", "worker"}
        serve.deploy(state_dir)
        api = state["prefect_ui"] + "/api"
        dep = httpx.get(f"{api}/deployments/name/{DEPLOYMENT}", timeout=30).raise_for_status().json()
        params = copy.deepcopy(dep["parameters"])
        recipe = params["recipe"]
        recipe["workdir"] = str(state_dir.parent / "work")
        recipe["generate"]["engine"] = "hf"
        recipe["eval"]["speed"] = False
        httpx.patch(f"{api}/deployments/{dep['id']}", json={"parameters": params}, timeout=30).raise_for_status()
        yield {**state, "api": api, "deployment_id": dep["id"], "defaults": params, "state_dir": state_dir,
               "flow_run_id": None}
    finally:
        serve.stop(state_dir)
    assert not any(serve.group_alive(pid) for pid in state["pids"].values()), "a service outlived stop()"
    assert not (state_dir / "services.json").exists()


@pytest.mark.long(57)
def test_deployment_run_through_api_logs_to_mlflow_server(services, tmp_path):
    state_dir = services["state_dir"]
    for line in (state_dir / "prefect-server.log").read_text().splitlines():
        assert "0.0.0.0" not in line  # bound to loopback only
    recipe = yaml.safe_load((REPO / "configs/tiny-test.yaml").read_text())
    recipe["workdir"] = str(tmp_path / "work")
    recipe["generate"]["engine"] = "hf"  # the services are under test here, not vLLM (flows/test_compress.py)
    recipe["prune"]["repair"] = {"num_samples": 4, "seq_len": 64}  # a nested section through the API
    recipe["eval"]["speed"] = False
    trigger = (
        "import json, sys\n"
        "from prefect.deployments import run_deployment\n"
        "fr = run_deployment('compress/tiny-test', parameters={'recipe': json.loads(sys.argv[1])}, timeout=1500)\n"
        "print(json.dumps({'state': fr.state.type.value, 'id': str(fr.id)}))\n"
    )
    env = serve.service_env(state_dir, services["prefect_port"], services["mlflow_port"])
    proc = subprocess.run([sys.executable, "-c", trigger, json.dumps(recipe)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=1600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    worker_log = (state_dir / "worker.log").read_text()
    assert result["state"] == "COMPLETED", worker_log[-5000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("compactlm-tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags
               and r.data.tags.get("prefect.flow_run_id") == result["id"]]
    assert len(parents) == 1
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert {k.info.run_name for k in kids} == {"generate", "score", "prune", "distill", "evaluate"}
    for k in kids:  # artifacts went through the server into its artifact store
        assert client.list_artifacts(k.info.run_id), k.info.run_name
    prune_run = next(k for k in kids if k.info.run_name == "prune")  # refitted on the generated data
    assert prune_run.data.metrics["repair_error_after"] < prune_run.data.metrics["repair_error_before"]
    assert any((state_dir / "mlartifacts").rglob("comparison.md"))


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path given too, selenium-manager never downloads
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _flow_run(services, flow_run_id: str) -> dict:
    import httpx

    return httpx.get(f"{services['api']}/flow_runs/{flow_run_id}", timeout=30).raise_for_status().json()


def _worker_log(services) -> str:
    return (services["state_dir"] / "worker.log").read_text(errors="replace")[-5000:]


def _wait_for_state(browser, services, flow_run_id: str) -> str:
    """Watch the flow run's page until its state badge shows a final state; returns that state's name."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    final = {"Completed", "Failed", "Crashed", "Cancelled", "TimedOut"}

    def badge(driver):
        text = " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, ".state-badge")).split()
        return next((t for t in text if t in final), False)

    try:
        return WebDriverWait(browser, WAIT_RUN, poll_frequency=2).until(badge)
    except Exception as e:  # say where the run is, with the worker's log
        raise AssertionError(f"flow run {flow_run_id} did not finish in the UI ({e!r}); API state: "
                             f"{_flow_run(services, flow_run_id)['state']}\n{_worker_log(services)}") from None


@needs_browser
@pytest.mark.long(42)
def test_prefect_custom_run_form_changes_a_nested_field(services, browser, tmp_path):
    import httpx
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    # the UI's browser code calls the API on this server's port, not the default 4200
    settings = httpx.get(f"{services['prefect_ui']}/ui-settings", timeout=30).json()
    assert settings["api_url"] == services["api"]
    before = {r["id"] for r in httpx.post(f"{services['api']}/flow_runs/filter", json={}, timeout=30).json()}

    wait = WebDriverWait(browser, WAIT_UI)
    browser.get(f"{services['prefect_ui']}/deployments/deployment/{services['deployment_id']}")
    wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "button.run-menu__run-button"))).click()
    wait.until(EC.element_to_be_clickable((By.LINK_TEXT, "Custom run"))).click()

    # the form: one property per field, nested as the recipe is; Distill (Optional) > Steps (Optional)
    prop = ("//div[contains(@class,'schema-form-property')]"
            "[./div[contains(@class,'p-label__header')]//span[normalize-space()='{}']]")
    distill = wait.until(EC.visibility_of_element_located((By.XPATH, prop.format("Distill (Optional)"))))
    steps = distill.find_element(By.XPATH, "./div[contains(@class,'p-label__body')]"
                                 + prop.format("Steps (Optional)") + "//input")
    default = services["defaults"]["recipe"]["distill"]["steps"]
    assert steps.get_attribute("value") == str(default) != str(NEW_STEPS)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", steps)
    steps.send_keys(Keys.CONTROL, "a")
    steps.send_keys(str(NEW_STEPS))
    wait.until(lambda d: steps.get_attribute("value") == str(NEW_STEPS))
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", distill)  # the section and the field
    browser.save_screenshot(str(_screenshot_dir(tmp_path) / "prefect-run-form.png"))
    browser.find_element(By.XPATH, "//button[@type='submit'][normalize-space()='Submit']").click()

    # back on the deployment's page, the new run is listed; follow it and watch its state badge
    def new_run(driver):
        links = driver.find_elements(By.CSS_SELECTOR, "a[href*='/runs/flow-run/']")
        ids = {a.get_attribute("href").split("/runs/flow-run/")[1].split("?")[0]: a for a in links}
        return next((i for i in ids if i not in before), False)

    try:  # the deployment page's run list refreshes on a timer, slowly on a loaded 2-core box
        flow_run_id = WebDriverWait(browser, 3 * WAIT_UI, poll_frequency=2).until(new_run)
    except Exception as e:  # say whether the run was created at all (the form) or only not listed yet (the page)
        runs = httpx.post(f"{services['api']}/flow_runs/filter", json={}, timeout=30).json()
        created = [(r["id"], r["state_type"]) for r in runs if r["id"] not in before]
        raise AssertionError(f"no new run listed on the deployment page ({e!r}); runs created since the form "
                             f"opened: {created}") from None
    services["flow_run_id"] = flow_run_id  # the MLflow test opens this run's results
    browser.get(f"{services['prefect_ui']}/runs/flow-run/{flow_run_id}")
    state = _wait_for_state(browser, services, flow_run_id)
    run = _flow_run(services, flow_run_id)
    assert state == "Completed" and run["state"]["type"] == "COMPLETED", _worker_log(services)

    # the run carries the changed nested value; every other field is the deployment's default
    recipe, defaults = run["parameters"]["recipe"], services["defaults"]["recipe"]
    assert recipe["distill"]["steps"] == NEW_STEPS
    for section, fields in defaults.items():
        for key, value in (fields.items() if isinstance(fields, dict) else [(None, fields)]):
            got = recipe[section][key] if key else recipe[section]
            if (section, key) != ("distill", "steps"):
                assert got == value, (section, key, got, value)
    # ... and the pipeline trained with it: the distill stage's MLflow run logged that config
    client = MlflowClient(services["mlflow_ui"])
    kids = client.search_runs(
        [client.get_experiment_by_name(recipe["tracking"]["experiment"]).experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}' and attributes.run_name = 'distill'")
    assert len(kids) == 1 and kids[0].data.params["config.steps"] == str(NEW_STEPS)


def _ui_run(services) -> str:
    """The flow run the form test started; when this test runs alone, one started through the API instead."""
    import httpx

    if services["flow_run_id"] is None:
        params = copy.deepcopy(services["defaults"])
        params["recipe"]["distill"]["steps"] = NEW_STEPS
        run = httpx.post(f"{services['api']}/deployments/{services['deployment_id']}/create_flow_run",
                         json={"parameters": params}, timeout=30).raise_for_status().json()
        services["flow_run_id"] = run["id"]
    return services["flow_run_id"]


def _markdown_rows(note: str) -> list[list[str]]:
    rows = [line.strip().strip("|").split("|") for line in note.splitlines() if line.strip().startswith("|")]
    return [[c.strip() for c in row] for row in rows if not set("".join(row)) <= set("-: ")]


@needs_browser
@pytest.mark.long(20)
def test_mlflow_run_page_shows_comparison_and_student(services, browser, tmp_path):
    from mlflow.tracking import MlflowClient
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    flow_run_id = _ui_run(services)
    browser.get(f"{services['prefect_ui']}/runs/flow-run/{flow_run_id}")
    assert _wait_for_state(browser, services, flow_run_id) == "Completed", _worker_log(services)

    client = MlflowClient(services["mlflow_ui"])  # the tracking URI the served deployment logs to
    exp = client.get_experiment_by_name(services["defaults"]["recipe"]["tracking"]["experiment"])
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    run_id = parent.info.run_id
    distill = next(r for r in runs if r.info.run_name == "distill")
    table = _markdown_rows(parent.data.tags["mlflow.note.content"])
    assert [row[0] for row in table] == ["model", "teacher", "pruned", "student"]

    wait = WebDriverWait(browser, WAIT_UI)
    browser.get(f"{services['mlflow_ui']}/#/experiments/{exp.experiment_id}/runs/{run_id}")
    # MLflow 3 opens in its GenAI view: switch to "Model training" (it lists the experiment's runs), open the run
    training = "//div[@role='button'][normalize-space()='Model training']"
    wait.until(EC.element_to_be_clickable((By.XPATH, training))).click()
    wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, f"a[href$='/runs/{run_id}']"))).click()
    wait.until(EC.url_matches(f"/runs/{run_id}$"))
    try:  # the assistant panel opens by itself on a first visit: close it for the screenshot
        WebDriverWait(browser, 10).until(EC.element_to_be_clickable(
            (By.CSS_SELECTOR, "button[data-component-id='mlflow.assistant.chat_panel.close']"))).click()
    except TimeoutException:
        pass

    # the description is the comparison table: expand it and read it cell by cell
    wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "[data-testid='show-comment-toggle']"))).click()
    shown = wait.until(EC.visibility_of_element_located(
        (By.CSS_SELECTOR, "[data-testid='note-editor-preview-content'] table")))
    cells = [[c.text.strip() for c in tr.find_elements(By.XPATH, "./th|./td")]
             for tr in shown.find_elements(By.TAG_NAME, "tr")]
    assert cells == table
    children = browser.find_element(By.CSS_SELECTOR, "[data-testid='key-value-Child runs']").text
    assert {"generate", "score", "prune", "distill", "evaluate"} <= {c.strip(" ,") for c in children.split()}
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(_screenshot_dir(tmp_path) / "mlflow-run.png"))

    # the student: a logged model of the distill child run, holding the model's files
    browser.find_element(By.XPATH, "//*[@data-testid='key-value-Child runs']//a[normalize-space()='distill']").click()
    wait.until(EC.url_matches(f"/runs/{distill.info.run_id}"))
    wait.until(EC.visibility_of_element_located((By.XPATH, "//*[normalize-space()='Logged models (1)']")))
    wait.until(EC.visibility_of_element_located((By.XPATH, "//*[normalize-space()='Logged models (1)']"
                                                 "/following::*[normalize-space()='student']")))
    models = [m for m in client.search_logged_models([exp.experiment_id]) if m.source_run_id == distill.info.run_id]
    assert [m.name for m in models] == ["student"]
    files = {Path(a.path).name for a in client.list_logged_model_artifacts(models[0].model_id)}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
