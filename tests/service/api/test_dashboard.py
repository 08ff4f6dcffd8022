"""The dashboard at `/`, driven by a real browser (Debian's Chromium, headless, through
Selenium and chromedriver) against a real API process and worker.

Screenshots go to $CNNSERVE_SCREENSHOTS (the README's come from there) or the test's tmp dir.
"""

from __future__ import annotations

import gzip
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from service.access.keys import add_key
from tests.conftest import FASHION_MNIST_DIR
from tests.service.conftest import Server
from tests.workers.helpers import WorkerProcess
from workers.celery_app import write_heartbeat
from workers.store.jobs import JobStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    where = Path(os.environ.get("CNNSERVE_SCREENSHOTS") or tmp_path / "screenshots")
    where.mkdir(parents=True, exist_ok=True)
    return where


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("Debian's chromium and chromium-driver are needed; `make test` installs them")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1280,800",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def wait(
    driver: WebDriver, what: str, until: Callable[[WebDriver], object], timeout: float = 60
) -> object:
    # the page re-renders live rows: an element found a moment ago may be gone; look again
    stale = (StaleElementReferenceException,)
    try:
        return WebDriverWait(driver, timeout, 0.2, ignored_exceptions=stale).until(until)
    except TimeoutException:
        text = driver.find_element(By.TAG_NAME, "body").text
        pytest.fail(f"timed out waiting for {what}; the page says:\n{text[-2500:]}")


def field(driver: WebDriver, name: str) -> WebElement:
    return driver.find_element(By.ID, f"spec-{name}")


def fill(driver: WebDriver, **values: object) -> None:
    for name, value in values.items():
        element = field(driver, name)
        if element.tag_name == "select":
            Select(element).select_by_value(str(value))
        else:
            element.clear()
            element.send_keys(str(value))


def trouser_png(tmp_path: Path) -> Path:
    raw = gzip.decompress((FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").read_bytes())
    path = tmp_path / "trouser.png"  # the third test image
    Image.frombytes("L", (28, 28), raw[16 + 2 * 784 : 16 + 3 * 784]).save(path)
    return path


def test_a_person_trains_lenet_watches_it_and_classifies_with_it(
    uvicorn_server: Callable[..., Server],
    start_worker: Callable[..., WorkerProcess],
    browser: WebDriver,
    shots: Path,
    tmp_path: Path,
) -> None:
    server = uvicorn_server()
    worker = start_worker()
    browser.get(f"{server.url}/#/train")
    wait(browser, "the form", lambda d: d.find_elements(By.ID, "spec-epochs"))
    Select(browser.find_element(By.ID, "spec-model")).select_by_value("lenet")
    assert field(browser, "lr").get_attribute("value") == "0.1"  # the book's recipe
    assert field(browser, "epochs").get_attribute("max") == "100"  # the spec's bounds
    # three epochs over all 60,000 images: above 0.8 val acc, enough to tell a trouser
    fill(browser, epochs=3, optimizer="adamw", lr=0.003, device="cpu")
    browser.find_element(By.CSS_SELECTOR, "main button[type=submit]").click()

    wait(browser, "the job's page", lambda d: "#/jobs/" in d.current_url)
    job_id = browser.current_url.rsplit("/", 1)[1]
    bar = wait(
        browser,
        "a moving progress bar",
        lambda d: [
            p
            for p in d.find_elements(By.CSS_SELECTOR, "progress")
            if float(p.get_attribute("value") or 0) > 0
        ],
    )
    assert bar

    def plotted_epochs(d: WebDriver) -> int:
        return int(d.find_element(By.CSS_SELECTOR, "img.plot").get_attribute("data-epochs") or 0)

    wait(
        browser,
        "the first epoch's row",
        lambda d: d.find_elements(By.XPATH, "//tbody/tr/td[1][text()='1']"),
    )
    wait(browser, "the curves with the first epoch", lambda d: plotted_epochs(d) >= 1)
    wait(browser, "the curves grown to two epochs", lambda d: plotted_epochs(d) >= 2)
    browser.save_screenshot(str(shots / "job-running.png"))  # curves growing, epoch 3 under way
    wait(
        browser,
        "the job to finish",
        lambda d: "succeeded" in d.find_element(By.TAG_NAME, "h1").text,
        120,
    )
    wait(
        browser,
        "three epochs in the table",
        lambda d: d.find_elements(By.XPATH, "//tbody/tr/td[1][text()='3']"),
    )
    wait(
        browser,
        "the confusion matrix",
        lambda d: d.find_elements(By.CSS_SELECTOR, "img[alt^='Confusion matrix']"),
    )
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "best" in page and "latest" in page and "ONNX" in page
    browser.save_screenshot(str(shots / "job.png"))

    browser.get(f"{server.url}/#/jobs")
    row = wait(
        browser,
        "the job in the table",
        lambda d: d.find_elements(By.CSS_SELECTOR, f"tr[data-job='{job_id}']"),
    )
    assert "succeeded" in row[0].text and "%" in row[0].text  # status and best val acc
    # the workers, and what each trains on
    line = wait(
        browser,
        "the workers line",
        lambda d: (
            worker.name in d.find_element(By.ID, "workers").text
            and d.find_element(By.ID, "workers").text
        ),
    )
    assert f"Workers: {worker.name} (cpu)" in str(line)
    browser.save_screenshot(str(shots / "jobs.png"))

    best = browser.execute_script(f"return fetch('v1/jobs/{job_id}').then(r => r.json())")[
        "best_checkpoint"
    ]
    browser.get(f"{server.url}/#/classify?ref={best}")
    wait(browser, "the classify page", lambda d: d.find_elements(By.ID, "c-files"))
    browser.find_element(By.ID, "c-files").send_keys(str(trouser_png(tmp_path)))
    label = wait(
        browser, "a prediction", lambda d: d.find_elements(By.CSS_SELECTOR, ".result .predicted")
    )
    assert label[0].text == "trouser"
    bars = browser.find_elements(By.CSS_SELECTOR, ".result .bar")
    assert len(bars) == 3 and "%" in bars[0].text
    seen = browser.find_element(By.CSS_SELECTOR, ".result canvas")
    lit = browser.execute_script(
        "const c = arguments[0].getContext('2d').getImageData(0, 0, 28, 28).data;"
        "let n = 0; for (let i = 0; i < c.length; i += 4) if (c[i] > 50) n++; return n;",
        seen,
    )
    assert lit > 50  # the network's 28×28 input is drawn: a light garment on black
    browser.save_screenshot(str(shots / "classify.png"))

    browser.get(f"{server.url}/#/models")
    wait(browser, "the layer table", lambda d: d.find_elements(By.XPATH, "//td[text()='Conv2d']"))
    assert "Conv2d output shape:" in browser.find_element(By.TAG_NAME, "pre").text


def test_a_refused_spec_says_why_next_to_the_field_it_names(
    uvicorn_server: Callable[..., Server], browser: WebDriver, shots: Path
) -> None:
    server = uvicorn_server()
    browser.get(f"{server.url}/#/train")
    wait(browser, "the form", lambda d: d.find_elements(By.ID, "spec-input_size"))
    Select(browser.find_element(By.ID, "spec-model")).select_by_value("vgg")
    fill(browser, input_size=28)  # in bounds, but VGG's five pools cannot take it
    browser.find_element(By.CSS_SELECTOR, "main button[type=submit]").click()
    error = browser.find_element(By.ID, "spec-input_size-error")
    wait(browser, "the message", lambda d: error.text)
    assert "does not fit vgg: it needs an input_size of 32 or more" in error.text
    assert field(browser, "input_size").get_attribute("aria-invalid") == "true"
    assert "null" not in browser.find_element(By.TAG_NAME, "main").text.split("\n")[:3]
    assert "#/train" in browser.current_url  # nothing was submitted
    browser.save_screenshot(str(shots / "refused.png"))


def test_the_forms_and_layer_tables_know_each_networks_sizes_and_archs(
    uvicorn_server: Callable[..., Server], browser: WebDriver, shots: Path
) -> None:
    server = uvicorn_server()
    browser.get(f"{server.url}/#/train")
    wait(browser, "the form", lambda d: d.find_elements(By.ID, "spec-input_size"))
    models = [o.get_attribute("value") for o in Select(field(browser, "model")).options]
    assert models[:3] == ["lenet", "vgg", "resnet18"] and "regnetx32" in models

    Select(field(browser, "model")).select_by_value("alexnet")
    assert field(browser, "input_size").get_attribute("value") == "224"  # the book's resize
    assert field(browser, "input_size").get_attribute("min") == "65"
    assert browser.find_element(By.ID, "spec-input_size-help").text.startswith("65 … 224")
    assert not field(browser, "arch").is_enabled()  # the book's AlexNet takes no arch
    fill(browser, input_size=64)
    browser.find_element(By.CSS_SELECTOR, "main button[type=submit]").click()
    error = browser.find_element(By.ID, "spec-input_size-error")
    wait(browser, "the message", lambda d: error.text)
    assert "it needs an input_size of 65 or more" in error.text

    Select(field(browser, "model")).select_by_value("densenet")
    assert field(browser, "input_size").get_attribute("min") == "29"
    assert "growth_rate" in (field(browser, "arch").get_attribute("placeholder") or "")
    fill(browser, arch='{"growth_rate": 0}', epochs=1)
    browser.find_element(By.CSS_SELECTOR, "main button[type=submit]").click()
    error = browser.find_element(By.ID, "spec-arch-error")
    wait(browser, "the arch message", lambda d: error.text)
    assert "growth_rate must be 1-128" in error.text

    browser.get(f"{server.url}/#/models")
    wait(browser, "the layer table", lambda d: d.find_elements(By.XPATH, "//td[text()='Conv2d']"))
    Select(browser.find_element(By.ID, "m-model")).select_by_value("densenet")
    wait(
        browser, "DenseNet's rows", lambda d: d.find_elements(By.XPATH, "//td[text()='DenseBlock']")
    )
    printout = browser.find_element(By.TAG_NAME, "pre").text
    second = " ".join(printout.splitlines()[1].split())  # the tab shows as spaces
    assert second == "DenseBlock output shape: torch.Size([1, 192, 24, 24])"
    arch = browser.find_element(By.ID, "m-arch")
    arch.send_keys('{"growth_rate": 16, "arch": [2, 2]}')
    browser.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
    wait(
        browser,
        "the smaller DenseNet",
        lambda d: "torch.Size([1, 96, 24, 24])" in d.find_element(By.TAG_NAME, "pre").text,
    )
    browser.save_screenshot(str(shots / "models-densenet.png"))


def test_a_server_with_keys_asks_for_one_and_the_key_is_kept_for_the_tab(
    uvicorn_server: Callable[..., Server], browser: WebDriver, shots: Path
) -> None:
    server = uvicorn_server(CNNSERVE_API_KEYS="dashboard-key-7f3c")
    browser.get(f"{server.url}/#/train")
    banner = browser.find_element(By.ID, "banner")
    wait(browser, "the key prompt", lambda d: banner.is_displayed())
    assert "needs an API key" in banner.text and "read scope" in banner.text
    assert browser.switch_to.active_element.get_attribute("id") == "apikey"
    browser.save_screenshot(str(shots / "key.png"))

    key = browser.find_element(By.ID, "apikey")
    key.send_keys("dashboard-key-7f3c")
    browser.find_element(By.CSS_SELECTOR, "#keyform button[type=submit]").click()
    wait(browser, "the form", lambda d: d.find_elements(By.ID, "spec-epochs"))
    fill(browser, epochs=1, train_limit=100)
    browser.find_element(By.CSS_SELECTOR, "main button[type=submit]").click()
    wait(browser, "the job's page", lambda d: "#/jobs/" in d.current_url)
    browser.refresh()  # kept for the tab
    state = browser.find_element(By.ID, "keystate")
    wait(browser, "who the key is", lambda d: "admin" in state.text)
    assert "sees every tenant" in state.text


def test_a_read_only_key_sees_what_it_may_not_do(
    uvicorn_server: Callable[..., Server],
    browser: WebDriver,
    shots: Path,
    tmp_path: Path,
    store: JobStore,
) -> None:
    keys_file = tmp_path / "keys.toml"
    key, _, _ = add_key(keys_file, "reader", ["read"])
    write_heartbeat(store.r, {"name": "trainer-1@gpu-host", "device": "cpu", "job": None})
    server = uvicorn_server(CNNSERVE_API_KEYS_FILE=str(keys_file))
    browser.get(f"{server.url}/#/jobs")
    state = browser.find_element(By.ID, "keystate")
    wait(browser, "the page to ask who it is", lambda d: state.text == "no key")
    browser.find_element(By.ID, "apikey").send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "#keyform button[type=submit]").click()
    wait(browser, "who the key is", lambda d: "reader" in state.text)
    assert "may read" in state.text and "sees its own work" in state.text

    # a worker is up; which, and on what device, is for an admin's key
    def line(d: WebDriver) -> str:
        return " ".join(e.text for e in d.find_elements(By.ID, "workers"))

    wait(browser, "the workers line", lambda d: "up (an admin's key" in line(d))
    assert "trainer-1" not in line(browser)
    browser.get(f"{server.url}/#/train")
    wait(browser, "the form", lambda d: d.find_elements(By.ID, "spec-epochs"))
    note = browser.find_element(By.CSS_SELECTOR, "main [role=note]")
    assert "train scope" in note.text and "reader may read" in note.text
    button = browser.find_element(By.CSS_SELECTOR, "main button[type=submit]")
    assert not button.is_enabled()
    browser.save_screenshot(str(shots / "scoped.png"))


def test_the_dashboard_reads_well_narrow_and_is_keyboard_navigable(
    uvicorn_server: Callable[..., Server], browser: WebDriver
) -> None:
    server = uvicorn_server()
    browser.set_window_size(420, 900)
    browser.get(f"{server.url}/#/train")
    wait(browser, "the form", lambda d: d.find_elements(By.ID, "spec-epochs"))
    width = browser.execute_script("return document.documentElement.scrollWidth")
    assert width <= 420  # no sideways scrolling on a narrow window
    for element in browser.find_elements(By.CSS_SELECTOR, "input, select"):
        element_id = element.get_attribute("id")
        assert browser.find_elements(By.CSS_SELECTOR, f"label[for='{element_id}']"), element_id
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("\ue004")  # Tab
    assert browser.switch_to.active_element.text == "Skip to the content"
    time.sleep(0.1)
