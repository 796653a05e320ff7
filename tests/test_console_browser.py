"""The web console in a real browser: Debian's Chromium driven by Playwright against the real
stack (tiny models). Screenshots go to $LOOMIS_CONSOLE_SCREENSHOTS when set (the README's
come from there), else to the test's temporary folder."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import RunningStack
from tests.test_compat_openai import picture, png

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("LOOMIS_CONSOLE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def signed_in(browser: Browser, stack: RunningStack, width: int = 1280, height: int = 800) -> Page:
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(f"{stack.url}/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("API key").fill("lmk_wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator('.error[data-field="key"]')).not_to_be_empty()
    page.get_by_label("API key").fill(stack.keys["alice"])
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Generate")).to_be_visible()
    return page


def test_sign_in_generate_with_live_progress_and_sign_out(
        stack: RunningStack, browser: Browser, tmp_path: Path) -> None:
    folder = shots(tmp_path)
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(f"{stack.url}/")
    page.screenshot(path=str(folder / "sign-in.png"))
    page.close()
    page = signed_in(browser, stack)
    page.get_by_label("Prompt", exact=True).fill("a red fox in snow")
    page.get_by_label("Model", exact=True).select_option("tiny-sd15")
    page.get_by_label("Width").fill("64")
    page.get_by_label("Height").fill("64")
    page.get_by_label("Steps").fill("12")
    page.locator("#seed").fill("42")
    page.get_by_role("button", name="Generate").click()
    image = page.locator("#results img").first
    expect(image).to_be_visible(timeout=120_000)
    progress = page.locator("#progress")
    assert int(progress.get_attribute("data-updates") or 0) >= 2  # it moved, step by step
    assert page.evaluate("document.querySelector('#progress').value") == 1
    page.wait_for_function("document.querySelector('#results img').naturalWidth === 64")
    page.screenshot(path=str(folder / "generate.png"), full_page=True)
    # "use again" puts the parameters back in the form
    page.get_by_role("button", name="Use again").first.click()
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a red fox in snow")
    expect(page.locator("#seed")).to_have_value("42")
    page.get_by_role("link", name="Jobs").click()
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    expect(page.locator("#job-rows tr").first).to_contain_text("generation")
    page.screenshot(path=str(folder / "jobs.png"))
    page.locator("#job-rows a").first.click()
    expect(page.locator("#job-status")).to_have_text("succeeded")
    page.screenshot(path=str(folder / "job.png"), full_page=True)
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.evaluate("localStorage.getItem('loomis.key')") is None


def test_a_drawn_mask_inpaints_and_keeps_every_unmasked_pixel(
        stack: RunningStack, browser: Browser, tmp_path: Path) -> None:
    source = tmp_path / "photo.png"
    source.write_bytes(png(picture()))
    page = signed_in(browser, stack)
    page.get_by_label("Prompt", exact=True).fill("a window")
    page.get_by_label("Model", exact=True).select_option("tiny-sd15")
    page.get_by_label("Mode", exact=True).select_option("inpaint")
    page.get_by_label("Init image", exact=True).set_input_files(str(source))
    page.wait_for_function("document.querySelector('#init-canvas').width === 64")
    page.get_by_label("Steps").fill("4")
    box = page.locator("#mask-canvas").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    for step in range(10):
        page.mouse.move(box["x"] + box["width"] * (0.3 + 0.04 * step),
                        box["y"] + box["height"] * (0.3 + 0.04 * step))
    page.mouse.up()
    masked = np.array(page.evaluate("""() => {
        const c = document.querySelector('#mask-canvas');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)
            .filter((_, i) => i % 4 === 3); }""")).reshape(64, 64) > 0
    assert masked.any() and not masked.all()
    page.screenshot(path=str(shots(tmp_path) / "inpaint-mask.png"), full_page=True)
    page.get_by_role("button", name="Generate").click()
    image = page.locator("#results img").first
    expect(image).to_be_visible(timeout=120_000)
    result = np.asarray(Image.open(io.BytesIO(httpx.get(image.get_attribute("src") or "")
                                              .content)).convert("RGB")).astype(int)
    original = np.asarray(picture()).astype(int)
    assert np.array_equal(result[~masked], original[~masked])
    assert (np.abs(result[masked] - original[masked]).sum(axis=1) > 0).any()


def test_a_bad_value_shows_the_apis_error_next_to_its_field(
        stack: RunningStack, browser: Browser) -> None:
    page = signed_in(browser, stack, width=390, height=844)  # a phone's width
    page.get_by_label("Prompt", exact=True).fill("x")
    page.get_by_label("Model", exact=True).select_option("tiny-sd15")
    page.get_by_label("Steps").fill("9999")
    page.get_by_role("button", name="Generate").click()
    error = page.locator('.error[data-field="steps"]')
    expect(error).to_contain_text("500")
    # a rule the gateway checks (eta needs DDIM) lands next to its field too
    page.get_by_label("Steps").fill("2")
    page.get_by_label("Eta (DDIM only)").fill("0.5")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator('.error[data-field="eta"]')).to_contain_text("DDIM")
    expect(error).to_be_empty()
    # keyboard only: Tab walks the labelled fields in order
    page.locator("#prompt").focus()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "negative_prompt"


def test_dataset_zip_caption_edit_training_chart_and_a_scene(
        stack: RunningStack, browser: Browser, tmp_path: Path) -> None:
    from tests.test_scenes_e2e import catalog
    from tests.test_trainings_e2e import training_zip

    folder = shots(tmp_path)
    archive = tmp_path / "dogs.zip"
    archive.write_bytes(training_zip())
    page = signed_in(browser, stack)
    page.get_by_role("link", name="Datasets").click()
    expect(page.get_by_role("heading", name="Datasets")).to_be_visible()
    page.get_by_label("Name").fill("console-dogs")
    page.get_by_label("Training size (min side)").fill("64")
    page.locator("#dataset-files").set_input_files(str(archive))
    page.get_by_role("button", name="Upload").click()
    expect(page.get_by_role("heading", name="Dataset console-dogs")).to_be_visible()
    dataset_id = page.url.rsplit("/", 1)[-1]
    caption = page.locator("[data-edit=caption]").first
    caption.fill("a brown dog on grass")
    caption.press("Tab")
    expect(caption).to_have_attribute("data-saved", "yes")
    page.screenshot(path=str(folder / "dataset.png"), full_page=True)
    with stack.client() as client:
        items = client.get(f"/v1/datasets/{dataset_id}/items").json()["items"]
        assert "a brown dog on grass" in {item["caption"] for item in items}
    # a tiny training from the form: the chart gets points, a sample appears
    page.get_by_role("link", name="Training").click()
    page.get_by_label("Dataset").select_option(dataset_id)
    page.get_by_label("Base model").select_option("tiny-sd15")
    for label, value in (("Resolution", "64"), ("Min bucket", "64"), ("Rank", "4"),
                         ("Alpha", "4"), ("Learning rate", "0.005"), ("Steps", "4")):
        page.get_by_label(label, exact=True).fill(value)
    page.get_by_role("button", name="Train").click()
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=180_000)
    assert int(page.locator("#chart").get_attribute("data-points") or 0) == 4
    expect(page.locator("#samples img").first).to_be_visible()
    page.screenshot(path=str(folder / "training.png"), full_page=True)
    # compose a scene from the catalog
    with stack.client() as client:
        ids = catalog(client, "-console")
    page.get_by_role("link", name="Scenes").click()
    page.get_by_label("Place").select_option(ids["place"])
    page.get_by_label("Action", exact=True).select_option(ids["action"])
    expect(page.get_by_role("img", name="standing-console medium pose")).to_be_visible()
    page.get_by_label("Steps").fill("3")
    page.get_by_role("button", name="Compose").click()
    expect(page.locator("#results img").first).to_be_visible(timeout=180_000)
    page.screenshot(path=str(folder / "scenes.png"), full_page=True)


def test_controlnet_preview_lora_picker_outpaint_and_a_sweep(
        stack: RunningStack, browser: Browser, tmp_path: Path, model_cache: Path) -> None:
    from tests.lora_files import make_lora

    folder = shots(tmp_path)
    lora_file = tmp_path / "console-style.safetensors"
    lora_file.write_bytes(make_lora("sd15", cache_dir=model_cache, seed=44))
    photo = tmp_path / "photo.png"
    photo.write_bytes(png(picture()))
    page = signed_in(browser, stack)
    page.get_by_role("link", name="LoRAs").click()  # uploaded from the console's LoRA page
    page.get_by_label("LoRA file (.safetensors)").set_input_files(str(lora_file))
    page.get_by_label("Base model").select_option("tiny-sd15")
    page.get_by_role("button", name="Upload").click()
    expect(page.get_by_role("cell", name="console-style")).to_be_visible()
    with stack.client() as client:
        lora_id = next(item["id"] for item in client.get("/v1/loras").json()["items"]
                       if item["name"] == "console-style")
    page.get_by_role("link", name="Generate").click()
    expect(page.get_by_role("heading", name="Generate")).to_be_visible()
    page.get_by_label("Prompt", exact=True).fill("a house")
    page.get_by_label("Model", exact=True).select_option("tiny-sd15")
    page.get_by_label("Width").fill("64")
    page.get_by_label("Height").fill("64")
    page.get_by_label("Steps").fill("3")
    page.get_by_role("button", name="Add a unit").click()
    page.get_by_label("Type").select_option("canny")
    page.get_by_label("Image", exact=True).set_input_files(str(photo))
    page.get_by_role("button", name="Preview").click()
    expect(page.get_by_alt_text("Control image preview")).to_be_visible(timeout=60_000)
    page.get_by_role("button", name="Add a LoRA").click()
    page.get_by_label("LoRA", exact=True).select_option(label="console-style (sd15)")
    page.get_by_label("Weight").fill("0.7")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#results img").first).to_be_visible(timeout=120_000)
    page.screenshot(path=str(folder / "generate-controls.png"), full_page=True)
    with stack.client() as client:
        job = client.get("/v1/jobs", params={"kind": "generation", "limit": 1}).json()["items"][0]
        assert job["spec"]["controls"][0]["type"] == "canny"
        assert job["spec"]["loras"] == [{"id": lora_id, "weight": 0.7}]
    # outpaint: the canvas grows by what is added
    page.reload()
    page.get_by_label("Prompt", exact=True).fill("more sky")
    page.get_by_label("Model", exact=True).select_option("tiny-sd15")
    page.get_by_label("Mode", exact=True).select_option("outpaint")
    page.get_by_label("Init image", exact=True).set_input_files(str(photo))
    page.wait_for_function("document.querySelector('#init-canvas').width === 64")
    page.get_by_label("left").fill("16")
    page.get_by_label("Steps").fill("3")
    page.get_by_role("button", name="Generate").click()
    result = page.locator("#results img").first
    expect(result).to_be_visible(timeout=120_000)
    page.wait_for_function("document.querySelector('#results img').naturalWidth === 80")
    # a sweep over guidance: the contact sheet and its cells
    page.get_by_role("link", name="Sweeps").click()
    expect(page.get_by_role("heading", name="Sweep")).to_be_visible()
    page.get_by_label("Prompt").fill("a boat")
    page.get_by_label("Model").select_option("tiny-sd15")
    page.get_by_label("Steps").fill("2")
    page.get_by_label("Axis 1", exact=True).select_option("guidance_scale")
    page.get_by_label("Axis 1 values (comma-separated)").fill("2, 7")
    page.get_by_role("button", name="Sweep").click()
    expect(page.get_by_role("table", name="Contact sheet")).to_be_visible(timeout=120_000)
    assert page.locator("[data-cell]").count() == 2
    expect(page.get_by_role("columnheader", name="7")).to_be_visible()
    page.screenshot(path=str(folder / "sweep.png"), full_page=True)


def test_a_subject_from_photos_to_ready_live_then_deleted_with_what_goes_listed(
        stack: RunningStack, browser: Browser, tmp_path: Path) -> None:
    from tests.subject_support import photos

    files = []
    for index, data in enumerate(photos(3, seed=91)):
        path = tmp_path / f"p{index}.png"
        path.write_bytes(data)
        files.append(str(path))
    page = signed_in(browser, stack)
    page.get_by_role("link", name="Subjects").click()
    expect(page.get_by_role("heading", name="Subjects")).to_be_visible()
    page.get_by_label("Name").fill("Console Person")
    page.get_by_label("Class word").fill("woman")
    page.get_by_label("Preset").select_option("quick")
    page.get_by_label("Consent").fill("the person pictured, for this test")
    page.get_by_label("Photos (3 to 50)").set_input_files(files)
    page.get_by_role("button", name="Create").click()
    expect(page.locator("#subject-status")).to_have_text("ready", timeout=180_000)
    expect(page.get_by_role("list", name="Stages")).to_contain_text("training")
    expect(page.get_by_role("list", name="Stages")).to_contain_text("photos_deleted", timeout=60_000)
    page.screenshot(path=str(shots(tmp_path) / "subject.png"), full_page=True)
    subject_id = page.url.rsplit("/", 1)[-1]
    messages: list[str] = []

    def accept(dialog) -> None:  # type: ignore[no-untyped-def]
        messages.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    page.get_by_role("button", name="Delete everything").click()
    expect(page.get_by_role("heading", name="Subjects")).to_be_visible(timeout=60_000)
    assert "LoRA version" in messages[0] and "photos" in messages[0]
    with stack.client() as client:
        assert client.get(f"/v1/subjects/{subject_id}").status_code == 404
