"""The viewer page at ``/``, driven in headless Chromium (the system browser, through Playwright) against
the real ``nasx serve`` on loopback: what it shows must be what the service's JSON says."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

pytestmark = pytest.mark.slow

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser_executable() -> str:
    found = os.environ.get("NASX_BROWSER") or next(filter(None, map(shutil.which, BROWSERS)), None)
    if found:
        return found
    message = "no Chromium on PATH (apt-get install chromium, or set NASX_BROWSER to a Chromium binary)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        b = p.chromium.launch(executable_path=_browser_executable(), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(str(server.base_url) + "/")
    pg.wait_for_selector("#target option >> nth=1", state="attached")      # metadata loaded
    yield pg
    context.close()
    assert not errors, errors


def _explain_json(server, png: Path, **params) -> dict:
    r = server.post("/explain", params={"top_k": 5, "top_prototypes": 5, "heatmap": "true", **params},
                    files={"image": (png.name, png.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


def _active(pg, selector: str) -> list[str]:
    return pg.eval_on_selector_all(selector, "nodes => nodes.filter(n => n.classList.contains('active'))"
                                             ".map(n => n.dataset.prototype)")


def test_upload_shows_the_services_explanation_and_pairs_boxes_with_cards(page, server, digit_pngs, tmp_path):
    png = digit_pngs[3]
    expected = _explain_json(server, png)
    data = expected["explanations"][0]["data"]
    page.set_input_files("#file", str(png))
    page.wait_for_selector("#evidence .card")

    # the prediction and the evidence are the service's
    labels = page.locator("#predictions .label").all_inner_texts()
    assert labels == [p["label"] for p in expected["predictions"]]
    assert page.get_attribute("#predictions li >> nth=0 >> button", "aria-current") == "true"
    cards = page.locator("#evidence .card")
    assert cards.count() == len(data["top_prototypes"]) == 5
    assert [cards.nth(i).get_attribute("data-prototype") for i in range(5)] == \
        [str(e["prototype_id"]) for e in data["top_prototypes"]]
    boxes = page.locator("#boxes rect")
    assert boxes.count() == 5
    viewbox = page.get_attribute("#boxes", "viewBox")
    assert viewbox == f"0 0 {expected['image']['width']} {expected['image']['height']}"
    for e in data["top_prototypes"]:
        rect = page.locator(f'#boxes rect[data-prototype="{e["prototype_id"]}"]')
        x0, y0, x1, y1 = e["box_xyxy"]
        assert [rect.get_attribute(k) for k in ("x", "y", "width", "height")] == \
            [str(x0), str(y0), str(x1 - x0), str(y1 - y0)]
    assert page.inner_text("#evidence-sum .logit") == f"{data['logit']:.3f}"
    assert page.inner_text("#evidence-sum .evidence-total") == f"({data['evidence_sum']:.3f})"

    # hovering a box highlights its card, and the reverse; nothing else lights up
    top = boxes.nth(boxes.count() - 1)                       # the top-most box, not covered by another
    top_id = top.get_attribute("data-prototype")
    top.hover()
    assert _active(page, "#evidence .card") == [top_id]
    page.mouse.move(0, 0)
    assert _active(page, "#evidence .card") == []
    other = cards.nth(1 if cards.nth(0).get_attribute("data-prototype") == top_id else 0)
    other.hover()
    assert _active(page, "#boxes rect") == [other.get_attribute("data-prototype")]

    # the heatmap overlay draws the listed prototype's similarity map
    assert page.is_hidden("#heatmap")
    cards.nth(0).locator("button.heat").click()
    page.wait_for_selector("#heatmap", state="visible")
    assert cards.nth(0).locator("button.heat").get_attribute("aria-pressed") == "true"
    assert page.evaluate("() => { const c = document.getElementById('heatmap');"
                         " return [c.width, c.height]; }") == [8, 8]       # the model's input size
    cards.nth(0).locator("button.heat").click()
    assert page.is_hidden("#heatmap")

    page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)
    assert (tmp_path / "viewer.png").stat().st_size > 10_000


def test_the_boxes_follow_the_region_rule_chosen_and_the_caption_says_which(page, server, digit_pngs):
    png = digit_pngs[6]
    page.set_input_files("#file", str(png))
    page.wait_for_selector("#evidence .card")
    assert "the input each prototype's similarity depends on" in page.inner_text("#regions-caption")
    expected = _explain_json(server, png, regions="activation")["explanations"][0]["data"]["top_prototypes"]
    with page.expect_response(lambda r: "/explain" in r.url and "regions=activation" in r.url):
        page.select_option("#regions", "activation")
    expect(page.locator("#regions-caption")).to_contain_text("where each prototype's similarity map peaks")
    for e in expected:
        rect = page.locator(f'#boxes rect[data-prototype="{e["prototype_id"]}"]')
        x0, y0, x1, y1 = e["box_xyxy"]
        expect(rect).to_have_attribute("width", str(x1 - x0))
        assert [rect.get_attribute(k) for k in ("x", "y", "height")] == [str(x0), str(y0), str(y1 - y0)]


def test_a_click_on_a_class_survives_an_answer_that_lands_while_it_is_pressed(page, digit_pngs):
    page.set_input_files("#file", str(digit_pngs[5]))
    page.wait_for_selector("#evidence .card")
    second = page.locator("#predictions li").nth(1)
    class_id = second.get_attribute("data-class")
    box = second.locator("button").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    with page.expect_response(lambda r: "/explain" in r.url and "regions=activation" in r.url):
        page.select_option("#regions", "activation")          # another answer re-renders the page meanwhile
    expect(page.locator("#regions-caption")).to_contain_text("peaks")
    with page.expect_response(lambda r: "/explain" in r.url and f"class={class_id}" in r.url):
        page.mouse.up()
    page.wait_for_selector('#predictions li:nth-child(2) button[aria-current="true"]')


def test_another_class_and_fewer_prototypes(page, server, digit_pngs):
    png = digit_pngs[5]
    page.set_input_files("#file", str(png))
    page.wait_for_selector("#evidence .card")
    second = page.locator("#predictions li").nth(1)
    class_id = int(second.get_attribute("data-class"))
    expected = _explain_json(server, png, top_prototypes=3, **{"class": str(class_id)})
    page.fill("#n-prototypes", "3")
    # leaving the field also asks for the predicted class's evidence: wait for the chosen class's answer
    with page.expect_response(lambda r: "/explain" in r.url and f"class={class_id}" in r.url):
        second.locator("button").click()
    # selectors, not a JavaScript string: the page's CSP (script-src 'self') refuses to evaluate strings
    page.wait_for_selector('#predictions li:nth-child(2) button[aria-current="true"]')
    expect(page.locator("#evidence .card")).to_have_count(3)
    data = expected["explanations"][0]["data"]
    assert data["target_class_id"] == class_id
    assert page.get_attribute("#predictions li >> nth=1 >> button", "aria-current") == "true"
    assert page.locator("#evidence .card").evaluate_all("cs => cs.map(c => c.dataset.prototype)") == \
        [str(e["prototype_id"]) for e in data["top_prototypes"]]
    assert page.inner_text("#evidence-sum .logit") == f"{data['logit']:.3f}"


def test_an_inverted_image_shows_the_services_warning(page, server, digit_pngs, tmp_path):
    from PIL import Image
    inverted = tmp_path / "inverted.png"
    with Image.open(digit_pngs[0]) as im:
        Image.eval(im.convert("L"), lambda v: 255 - v).save(inverted)
    assert page.locator("#input-warning").is_hidden()
    page.set_input_files("#file", str(inverted))
    page.wait_for_selector("#input-warning", state="visible")
    assert "looks inverted" in page.inner_text("#input-warning")
    page.set_input_files("#file", str(digit_pngs[0]))
    page.wait_for_selector("#input-warning", state="hidden")


def test_a_late_answer_does_not_replace_a_newer_one(page, server, digit_pngs):
    page.set_input_files("#file", str(digit_pngs[5]))
    page.wait_for_selector("#evidence .card")
    second = page.locator("#predictions li").nth(1)
    class_id = second.get_attribute("data-class")
    # answers for the predicted class (no class= in the URL) now arrive 1.5 s late
    page.evaluate("""() => { const fetchNow = window.fetch;
        window.fetch = (url, options) => fetchNow(url, options).then((r) => String(url).includes('class=') ? r
            : new Promise((resolve) => setTimeout(() => resolve(r), 1500))); }""")
    page.fill("#n-prototypes", "3")
    with page.expect_response(lambda r: "/explain" in r.url and "class=" not in r.url):
        second.locator("button").click()   # leaving the field asks first, for the predicted class
    page.wait_for_selector('#predictions li:nth-child(2) button[aria-current="true"]')
    page.wait_for_timeout(2500)            # the first, older answer has come back by now
    assert page.get_attribute("#predictions li >> nth=1 >> button", "aria-current") == "true"
    assert page.get_attribute("#predictions li >> nth=1", "data-class") == class_id
    assert page.locator("#evidence .card").count() == 3


def test_a_text_file_shows_the_services_error(page, server, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image at all\n")
    expected = server.post("/explain", files={"image": ("notes.txt", text.read_bytes(), "text/plain")})
    assert expected.status_code == 400
    page.set_input_files("#file", str(text))
    page.wait_for_selector("#error", state="visible")
    message = page.inner_text("#error")
    assert message == f"{expected.json()['error']}: {expected.json()['detail']}"
    assert page.is_hidden("#result")
    assert page.get_attribute("#error", "role") == "alert"


def test_prototype_bank_lists_every_prototype_by_class(page, server):
    meta = server.get("/metadata").json()
    page.focus("#tab-explain")
    page.keyboard.press("ArrowRight")   # the tab list follows the ARIA pattern
    assert page.get_attribute("#tab-bank", "aria-selected") == "true"
    assert page.is_visible("#panel-bank") and page.is_hidden("#panel-explain")
    page.wait_for_selector(".bank-grid li")
    shown = page.locator("[data-prototype-bank]").evaluate_all("ls => ls.map(l => Number(l.dataset.prototypeBank))")
    assert sorted(shown) == [p["id"] for p in meta["prototypes"]]
    k = meta["prototypes"][0]["class_index"]
    page.select_option("#bank-class", str(k))
    own = [p["id"] for p in meta["prototypes"] if p["class_index"] == k]
    assert page.locator("[data-prototype-bank]").count() == len(own)
    alts = page.locator(".bank-grid img").evaluate_all("is => is.map(i => i.alt)")
    assert alts and all(alts)
    # the training patches are boxed by the rule "Boxes show" picks, the evidence rule by default
    sources = "is => is.map(i => i.getAttribute('src'))"
    assert page.locator(".bank-grid img").evaluate_all(sources) == [
        url for j in own for url in (f"/prototypes/{j}?regions=evidence", f"/prototypes/{j}/context?regions=evidence")]
    assert page.inner_text("#bank-rule") == "the input each similarity depends on"
    page.click("#tab-explain")
    page.select_option("#regions", "activation")
    page.click("#tab-bank")
    assert page.locator(".bank-grid img").evaluate_all(sources) == [
        url for j in own for url in (f"/prototypes/{j}", f"/prototypes/{j}/context")]
    assert page.inner_text("#bank-rule") == "where each similarity map peaks"


def test_keyboard_and_phone_width(page, digit_pngs):
    page.set_viewport_size({"width": 375, "height": 740})
    page.set_input_files("#file", str(digit_pngs[0]))
    page.wait_for_selector("#evidence .card")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375         # no sideways scrolling
    first = page.locator("#evidence .card").nth(0)
    first.focus()                                                               # cards are focusable
    assert _active(page, "#boxes rect") == [first.get_attribute("data-prototype")]
    page.focus("#file")                                                         # the file input is reachable
    assert page.evaluate("document.activeElement.id") == "file"
    imgs = page.locator("main img").evaluate_all("is => is.map(i => i.alt)")
    assert imgs and all(imgs)
