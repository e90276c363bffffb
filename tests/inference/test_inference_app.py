"""The web app in a real headless Chromium on 127.0.0.1: upload images, run the tiny model,
find a playable video (and an input error) on the page. Needs Debian's ``chromium`` and the
``playwright`` package (never ``playwright install``: it downloads browsers)."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from inference_helpers import (
    astronaut,
    grace_hopper,
    moving_face_video,
    read_mp4,
    save_png,
    tiny_pipeline,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    pytest.importorskip("gradio")
    from flows.app import build_app, launch

    demo = build_app(tiny_pipeline(), work_dir=tmp_path_factory.mktemp("app-out"))
    port = free_port()
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture
def page(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # fresh user data dir
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
        )
        page = context.new_page()
        outside: list[str] = []
        page.on(
            "request",
            lambda r: (
                outside.append(r.url)
                if not r.url.startswith(("http://127.0.0.1", "data:", "blob:"))
                else None
            ),
        )
        page.outside_requests = outside  # type: ignore[attr-defined]
        try:
            yield page
        finally:
            context.close()


def set_number(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def upload(page, elem_id: str, path: Path) -> None:
    page.set_input_files(f"#{elem_id} input[type=file]", str(path))
    page.wait_for_selector(f"#{elem_id} img", timeout=20_000)


def test_app_uploads_images_and_plays_the_result(app_url, page, tmp_path) -> None:
    grey = save_png(tmp_path / "grey.png", np.full((160, 160, 3), 128, np.uint8))
    portrait = save_png(tmp_path / "astronaut.png", astronaut())
    hair = save_png(tmp_path / "grace.png", grace_hopper())

    page.goto(app_url)
    page.wait_for_selector("#run", timeout=30_000)
    set_number(page, "frames", 4)
    set_number(page, "steps", 2)

    # An input error is shown in the page, as one line.
    upload(page, "portrait", grey)
    upload(page, "attribute-1", hair)
    page.click("#run")
    status = page.locator("#status")
    status.filter(has_text="error:").wait_for(timeout=60_000)
    assert "no face found in the portrait" in status.inner_text()

    # A valid request driven by an uploaded video: the result appears and the browser plays it.
    page.locator("#portrait button[aria-label='Remove Image']").click()
    upload(page, "portrait", portrait)
    drive = moving_face_video(tmp_path / "drive.mp4", grace_hopper(), num_frames=4)
    page.set_input_files("#driving-video input[type=file]", str(drive))
    page.wait_for_selector("#driving-video video", timeout=30_000)
    page.wait_for_function(
        "() => document.querySelector('#driving-kind input[value=video]').checked",
        timeout=10_000,
    )
    page.click("#run")
    status.filter(has_text="done:").wait_for(timeout=120_000)
    assert "4 frames" in status.inner_text() and "driven by video 'drive" in status.inner_text()
    video = page.locator("#result video")
    video.wait_for(timeout=30_000)
    page.wait_for_function(
        "() => { const v = document.querySelector('#result video');"
        " return v && v.readyState >= 2 && v.duration > 0 && v.videoWidth === 64; }",
        timeout=30_000,
    )
    assert page.evaluate("() => document.querySelector('#result video').error") is None
    # The same file is offered for download and decodes to the requested frames.
    link = page.locator("#download a").first
    link.wait_for(timeout=30_000)
    data = page.request.get(link.get_attribute("href")).body()
    (tmp_path / "dl.mp4").write_bytes(data)
    assert read_mp4(tmp_path / "dl.mp4").shape == (4, 64, 64, 3)
    assert page.outside_requests == []  # nothing left the machine
