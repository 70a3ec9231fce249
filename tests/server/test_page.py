"""The page at `/` in a real headless Chromium (Debian `chromium` + `chromium-driver`, driven by Selenium)
against a real uvicorn serving the real MobileNetV2: chelsea is classified "Egyptian cat" on the page;
the admin tab uploads a bundle with the token typed into it and the new domain classifies too. Each test
writes a screenshot into its temporary directory and prints the path."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from adapters_store import LocalStore
from server.app import create_app
from server.serving import ServerThread
from tests.server.conftest import ADMIN, chelsea_jpeg, settings_for

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
    reason="Debian chromium and chromium-driver are not installed (make browser)",
)
CATS = ["tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"]


@pytest.fixture(scope="module")
def server(imagenet_store: LocalStore) -> Iterator[ServerThread]:
    with ServerThread(create_app(settings_for(imagenet_store))) as running:
        yield running


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1000,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def _screenshot(driver: webdriver.Chrome, path: Path) -> None:
    assert driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def _classify_on_page(driver: webdriver.Chrome, domain: str, photo: Path) -> list[str]:
    wait = WebDriverWait(driver, 120)
    wait.until(
        lambda d: (
            domain in [o.get_attribute("value") for o in Select(d.find_element(By.ID, "domain")).options]
        )
    )
    Select(driver.find_element(By.ID, "domain")).select_by_value(domain)
    driver.find_element(By.ID, "file").send_keys(str(photo))
    driver.find_element(By.ID, "classify-button").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "meta"), f"{domain} version"))
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .bar .label")]


def test_page_is_one_dependency_free_file(server: ServerThread) -> None:
    r = httpx.get(server.url + "/", timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "<script src" not in r.text and "http://" not in r.text and "https://" not in r.text
    assert "localStorage" not in r.text and "sessionStorage" not in r.text and "document.cookie" not in r.text


def test_chelsea_is_an_egyptian_cat_on_the_page(
    server: ServerThread, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    photo = tmp_path / "chelsea.jpg"
    photo.write_bytes(chelsea_jpeg())
    browser.get(server.url + "/")
    labels = _classify_on_page(browser, "imagenet", photo)
    assert labels[0] == "Egyptian cat" and len(labels) == 5
    meta = browser.find_element(By.ID, "meta").text
    assert "imagenet version 1" in meta and " ms" in meta
    bar = browser.find_element(By.CSS_SELECTOR, "#results .bar .p").text
    assert 50 < float(bar.rstrip("%")) < 95
    _screenshot(browser, tmp_path / "classify.png")


def _cats_bundle(path: Path) -> None:
    """A head-only domain cut from five rows of the ImageNet classifier (as in server/README.md)."""
    import torch

    from adapters_store import Provenance
    from model_artifacts import domain_artifact, mobilenet_weights_path
    from model_artifacts.torchvision_import import imagenet_labels, imagenet_preprocessing
    from residual_adapters import AdapterConfig, create_backbone
    from training.export import write_bundle

    net = create_backbone("mobilenet_v2", weights=mobilenet_weights_path())
    rows = [imagenet_labels().index(c) for c in CATS]
    net.add_domain("cats", AdapterConfig(kind="head"), len(CATS))
    with torch.no_grad():
        net.head.domains["cats"].weight.copy_(net.head.base.weight[rows])
        net.head.domains["cats"].bias.copy_(net.head.base.bias[rows])
    provenance = Provenance(dataset="ImageNet rows", epochs=0, created_at=datetime.now(UTC))
    artifact = domain_artifact(
        net, "cats", labels=CATS, preprocessing=imagenet_preprocessing(), provenance=provenance
    )
    write_bundle(artifact, path)


def test_admin_tab_uploads_and_activates_a_bundle(
    server: ServerThread, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    bundle, photo = tmp_path / "cats.tar", tmp_path / "chelsea.jpg"
    _cats_bundle(bundle)
    photo.write_bytes(chelsea_jpeg())
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 120)
    browser.find_element(By.ID, "tab-admin").click()
    assert browser.find_element(By.ID, "classify").get_attribute("hidden") is not None
    browser.find_element(By.ID, "upload-domain").send_keys("cats")
    browser.find_element(By.ID, "bundle").send_keys(str(bundle))

    browser.find_element(By.ID, "token").send_keys("wrong")
    browser.find_element(By.ID, "upload-button").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "admin-status"), "HTTP 403"))
    assert "cats" not in [
        d["domain"] for d in httpx.get(server.url + "/v1/domains", timeout=60).json()["domains"]
    ]

    browser.find_element(By.ID, "token").clear()
    browser.find_element(By.ID, "token").send_keys(ADMIN)
    browser.find_element(By.ID, "upload-button").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "admin-status"), '"active":true'))
    status = browser.find_element(By.ID, "admin-status").text
    assert '"domain":"cats"' in status and '"version":1' in status
    _screenshot(browser, tmp_path / "admin.png")
    # The token was kept in memory only.
    stored = browser.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]")
    assert stored == [0, 0, ""]

    browser.find_element(By.ID, "tab-classify").click()
    labels = _classify_on_page(browser, "cats", photo)
    assert labels[0] == "Egyptian cat" and sorted(labels) == sorted(CATS)
    _screenshot(browser, tmp_path / "cats.png")
