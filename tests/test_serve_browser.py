"""`latentddpm serve` and the Space of `latentddpm make-space` in a real headless browser (Debian's chromium and
chromium-driver, driven by selenium; nothing is downloaded): type a prompt, press Generate, and the gallery's image
equals, pixel for pixel, the PNG of the `latentddpm sample` command that the page shows with it."""

import io
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from test_pipeline_loaders import our_pipeline

from latentddpm.pipelines import write_space

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,  # two servers and two browsers: about a minute
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
    ),
]
gr = pytest.importorskip("gradio", reason="needs latentddpm[app]")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (latentddpm[dev])")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PROMPT = "a red circle in the top left"
TIMEOUT = 180  # seconds, for a server to start or an image to appear on a busy machine


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pipeline")
    our_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator["webdriver.Chrome"]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server(argv: list[str], port: int, cwd: Path | None = None) -> Iterator[str]:
    """Run `argv` (a Gradio app on 127.0.0.1:`port`) until the block ends; yields its URL once it answers."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_SERVER_PORT": str(port)}
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"{shlex.join(argv)} exited with {process.returncode}:\n{process.stdout.read()}")
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{shlex.join(argv)} did not answer on {url} within {TIMEOUT} s")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def generate_in_page(driver, url: str, prompt: str) -> tuple[np.ndarray, str]:
    """Open the app, type `prompt`, press Generate; the pixels of the gallery's image and the command shown."""
    driver.get(url)
    wait = WebDriverWait(driver, TIMEOUT)
    wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea"))).send_keys(prompt)
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    image = wait.until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, "#gallery img")))
    with urllib.request.urlopen(image.get_attribute("src")) as response:
        pixels = np.asarray(PIL.Image.open(io.BytesIO(response.read())).convert("RGB"))
    # textContent: the command's one line as the DOM holds it, not as it wraps on screen
    code = (By.CSS_SELECTOR, "#command .cm-content")
    command = wait.until(lambda d: d.find_element(*code).get_attribute("textContent"))
    return pixels, command


def sample(command: str, out: Path) -> np.ndarray:
    """Run the page's `latentddpm sample ...` command in a shell of its own; the PNG's pixels."""
    argv = shlex.split(command)
    assert argv[:2] == ["latentddpm", "sample"]
    subprocess.run([sys.executable, "-m", "latentddpm.cli", *argv[1:], "--out", str(out)], check=True)
    return np.asarray(PIL.Image.open(out).convert("RGB"))


def test_serve_shows_the_image_that_its_sample_command_draws_and_bad_input_as_a_message(model, browser, tmp_path):
    port = free_port()
    argv = [sys.executable, "-m", "latentddpm.cli", "serve", "--model", str(model), "--port", str(port)]
    with server([*argv, "--device", "cpu"], port) as url:
        pixels, command = generate_in_page(browser, url, PROMPT)
        assert f"--prompt '{PROMPT}'" in command and "--seed 0 " in command and "--device cpu" in command
        np.testing.assert_array_equal(pixels, sample(command, tmp_path / "sample.png"))

        # An empty prompt is a message in the page, not a traceback (select and delete: the page's own keystrokes)
        browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(Keys.CONTROL, "a", Keys.DELETE)
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        WebDriverWait(browser, TIMEOUT).until(lambda d: "Enter a prompt" in d.find_element(By.TAG_NAME, "body").text)
        assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text


def test_the_space_app_shows_the_image_that_its_sample_command_draws(model, browser, tmp_path):
    space = write_space(tmp_path / "space", str(model))
    port = free_port()
    with server([sys.executable, "app.py"], port, cwd=space) as url:
        pixels, command = generate_in_page(browser, url, PROMPT)
        assert command.startswith(f"latentddpm sample --model {model} --prompt '{PROMPT}'")
        np.testing.assert_array_equal(pixels, sample(command, tmp_path / "sample.png"))
