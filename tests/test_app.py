"""cdm-app: both endpoints through gradio_client, the page in headless Chromium, and the Space export."""

import json
import os
import shutil
import socket
import time

import numpy as np
import PIL.Image
import pytest
from conftest import make_cascade, run_cli

from cdm.app import build_app

# the Generate endpoint's inputs: class, images, seed, guidance, aug mode, steps per stage, then the
# augmentation level of each SR stage
GENERATE = ("2: two, deuce", 2, 5, 1.0, "non-truncated", 2, 2, 2, 100, 50)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The app on 127.0.0.1 over a tiny three-stage cascade (8 -> 32 -> 128 px); its first SR stage upscales."""
    tmp = tmp_path_factory.mktemp("app")
    root = make_cascade(tmp / "cascade", sizes=(8, 32, 128))
    demo = build_app(str(root), str(root), workdir=tmp / "work")
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", tmp
    demo.close()


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"))


def test_generate_and_upscale_through_the_api(app_url):
    from gradio_client import Client, handle_file

    url, tmp = app_url
    client = Client(url, verbose=False)
    first = client.predict(*GENERATE, api_name="/generate")
    again = client.predict(*GENERATE, api_name="/generate")
    other = client.predict(*GENERATE[:2], 6, *GENERATE[3:], api_name="/generate")
    *galleries, timing = first
    assert [[pixels(i["image"]).shape[:2] for i in g] for g in galleries] == [
        [(8, 8)] * 2,
        [(32, 32)] * 2,
        [(128, 128)] * 2,
    ]
    assert all(name in timing for name in ("base64", "sr64to256", "sr256to1024"))
    for a, b in zip(galleries, again[:-1]):  # the same seed gives the same images
        assert all(np.array_equal(pixels(x["image"]), pixels(y["image"])) for x, y in zip(a, b))
    assert not np.array_equal(pixels(galleries[-1][0]["image"]), pixels(other[-2][0]["image"]))

    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(
        tmp / "small.png"
    )
    (bicubic, result), download = client.predict(
        handle_file(str(tmp / "small.png")), 1, 0, api_name="/upscale"
    )
    assert pixels(result).shape[:2] == pixels(bicubic).shape[:2] == (48, 64)
    assert np.array_equal(pixels(download), pixels(result))  # the PNG offered for download is the result


def test_bad_inputs_show_a_message_and_the_server_lives_on(app_url):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url, tmp = app_url
    client = Client(url, verbose=False)
    (tmp / "fake.png").write_text("not an image")
    with pytest.raises(AppError, match="fake.png"):
        client.predict(handle_file(str(tmp / "fake.png")), 1, 0, api_name="/upscale")
    with pytest.raises(AppError, match="noise_level=5000"):
        client.predict(*GENERATE[:8], 100, 5000, api_name="/generate")
    with pytest.raises(AppError, match="class id 9"):
        client.predict("9", *GENERATE[1:], api_name="/generate")
    with pytest.raises(AppError, match="steps=0"):
        client.predict(*GENERATE[:5], 0, *GENERATE[6:], api_name="/generate")
    assert len(client.predict(*GENERATE, api_name="/generate")) == 4  # still serving


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1600"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


def wait_for(driver, script: str, timeout: float = 120):
    """Poll a JavaScript expression until it returns something truthy."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for: {script}")


NATURAL_SIZES = """
const sizes = [0, 1, 2].map(k => Array.from(document.querySelectorAll(`#stage-${k} img`))
    .filter(img => img.complete && img.naturalWidth > 0).map(img => img.naturalWidth));
return sizes.every(s => s.length > 0) ? sizes : null;
"""


def test_the_page_in_headless_chromium(app_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, tmp = app_url
    shots = tmp / "screenshots"
    shots.mkdir(exist_ok=True)
    driver = chromium()
    try:
        driver.get(url)
        wait_for(driver, "return document.querySelector('#generate-button')")
        box = driver.find_element(By.CSS_SELECTOR, "input[aria-label='Class'], [data-testid='textbox'] input")
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys("1: one", Keys.ENTER)
        driver.find_element(By.ID, "generate-button").click()
        sizes = wait_for(driver, NATURAL_SIZES)
        assert [set(s) for s in sizes] == [{8}, {32}, {128}], sizes
        driver.save_screenshot(str(shots / "generate.png"))

        driver.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Upscale')]").click()
        PIL.Image.fromarray(np.full((12, 16, 3), 90, np.uint8)).save(tmp / "photo.png")
        upload = wait_for(driver, "return document.querySelector('#upscale-input input[type=file]')")
        upload.send_keys(str(tmp / "photo.png"))
        wait_for(
            driver,
            r"return document.querySelector('#upscale-input')?.innerText.replace(/\s/g, '').includes('photo.png')",
        )
        driver.find_element(By.ID, "upscale-button").click()
        wait_for(
            driver,
            "return Array.from(document.querySelectorAll('#upscale-slider img'))"
            ".some(img => img.complete && img.naturalWidth === 64)",
        )
        driver.save_screenshot(str(shots / "upscale.png"))

        (tmp / "text.png").write_text("this is text, not a picture")
        driver.find_element(By.CSS_SELECTOR, "#upscale-input button[aria-label='Clear']").click()
        upload = wait_for(driver, "return document.querySelector('#upscale-input input[type=file]')")
        upload.send_keys(str(tmp / "text.png"))
        wait_for(
            driver,
            r"return document.querySelector('#upscale-input')?.innerText.replace(/\s/g, '').includes('text.png')",
        )
        driver.find_element(By.ID, "upscale-button").click()
        message = wait_for(
            driver,
            "return Array.from(document.querySelectorAll('.toast-body, [data-testid=toast-body]'))"
            ".map(e => e.innerText).join(' ')",
        )
        assert "text.png" in message and "image" in message, message
        driver.save_screenshot(str(shots / "upscale-error.png"))
    finally:
        driver.quit()
    assert all(
        (shots / f).stat().st_size > 1000 for f in ("generate.png", "upscale.png", "upscale-error.png")
    )


def test_space_export_writes_an_app_that_names_the_cascade(tmp_path):
    import yaml

    root = make_cascade(tmp_path / "c", sizes=(8, 32))
    space = tmp_path / "space"
    res = run_cli(
        [
            "cdm-export",
            str(root / "base64"),
            str(root / "sr64to256"),
            "--out",
            str(tmp_path / "digits"),
            "--space",
            str(space),
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    text = (space / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["sdk"] == "gradio" and front["models"] == ["digits"]  # the repo is named after --out
    assert (space / front["app_file"]).is_file() and front["sdk_version"] and front["title"]
    app = (space / "app.py").read_text()
    compile(app, "app.py", "exec")
    assert "build_app(model='digits')" in app
    requirements = (space / "requirements.txt").read_text().split()
    assert all("==" in r for r in requirements) and any(r.startswith("gradio==") for r in requirements)
    assert os.access(space / "app.py", os.R_OK)
    again = run_cli(["cdm-export", str(tmp_path / "digits"), "--space", str(space)], tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr  # nothing replaced without --overwrite
    assert json.loads(json.dumps(front))  # plain YAML values only
