"""The page `qkv serve` shows at `/`, in headless Chromium (Debian's, driven by Playwright), with
every request that does not go to the server itself blocked: type a sentence, see the
translation the API gives, a drawn cross-attention heatmap that follows the hovered token, and
the beam-search tree; a language model's text streams in."""

from __future__ import annotations

import threading
import time

import pytest
import uvicorn

from .conftest import free_port
from .test_explain import browser  # noqa: F401 (the module's Chromium fixture)
from .test_server import dirs, make_app, sources  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def base_url(dirs):  # noqa: F811
    app = make_app(dirs, ("translation", "lm", "classify", "items"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    app.state.close()


def open_home(browser, base_url):  # noqa: F811
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors, blocked = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    def route(r):
        if r.request.url.startswith(base_url):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(base_url + "/")
    page.wait_for_function("window.qkvPageReady === true", timeout=10000)
    return page, errors, blocked


def frame_of(page, path: str):
    """The frame showing `path`, once its page has drawn."""
    for _ in range(200):
        for f in page.frames:
            if path in f.url:
                f.wait_for_function("window.qkvReady === true", timeout=20000)
                return f
        page.wait_for_timeout(50)  # lets Playwright see the frame navigate
    raise AssertionError(f"no frame shows {path}")


def test_a_sentence_shows_its_translation_heatmap_and_beam_tree(
    browser,  # noqa: F811
    base_url,
    corpus,
):
    import httpx

    text = sources(corpus, 2)[1]
    want = httpx.post(f"{base_url}/v1/translate", json={"texts": [text], "beam": 3}).json()
    page, errors, blocked = open_home(browser, base_url)
    models = page.eval_on_selector_all("#model option", "os => os.map(o => o.textContent)")
    assert any("(translation)" in m for m in models) and any("(lm)" in m for m in models)
    page.fill("#beam", "3")
    page.fill("#text", text)
    page.click("#go")
    page.wait_for_function("document.querySelectorAll('#nbest li').length === 3")
    assert page.inner_text("#output") == want["translations"][0]["text"]

    attention = frame_of(page, "/pages/attention")
    assert attention.eval_on_selector("#kind", "s => s.value") == "cross"
    inked = """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 250) n++; return n; }"""
    assert attention.eval_on_selector("#heatmap", inked) > 500  # cells drawn, not a blank
    attention.hover("#queries .tok >> nth=1")
    shaded = attention.eval_on_selector_all("#keys .tok", "ks => ks.map(k => k.style.background)")
    assert shaded and all(s.startswith("rgb") for s in shaded)

    tree = frame_of(page, "/pages/beam")
    assert tree.eval_on_selector_all("#tree circle", "cs => cs.length") > 3
    best = tree.eval_on_selector_all("#nbest li", "ls => ls.map(l => l.textContent)")
    assert want["translations"][0]["text"] in best[0]
    assert not errors and not blocked, (errors, blocked)


def test_a_prompt_streams_in_and_shows_the_causal_self_attention(browser, base_url):  # noqa: F811
    page, errors, blocked = open_home(browser, base_url)
    lm = page.eval_on_selector_all(
        "#model option", "os => os.filter(o => o.textContent.includes('(lm)'))[0].value"
    )
    page.select_option("#model", lm)
    page.fill("#tokens", "30")
    page.fill("#text", "ROMEO:")
    page.press("#text", "Enter")
    page.wait_for_function(
        "document.getElementById('output').textContent.length >= 'ROMEO:'.length + 30"
    )
    assert page.inner_text("#output").startswith("ROMEO:")
    attention = frame_of(page, "/pages/attention")
    assert attention.eval_on_selector("#kind", "s => s.value") == "decoder self"
    assert not errors and not blocked, (errors, blocked)


def choose(page, task: str) -> None:
    value = page.eval_on_selector_all(
        "#model option", f"os => os.filter(o => o.textContent.includes('({task})'))[0].value"
    )
    page.select_option("#model", value)


def test_a_classifier_shows_its_label_and_attention(browser, base_url):  # noqa: F811
    import httpx

    want = httpx.post(f"{base_url}/v1/classify", json={"texts": ["a good film"]}).json()
    page, errors, blocked = open_home(browser, base_url)
    choose(page, "classify")
    page.fill("#text", "a good film")
    page.click("#go")
    label = want["results"][0]["label"]
    page.wait_for_function(f"document.getElementById('output').textContent.startsWith('{label}')")
    assert page.eval_on_selector_all("#nbest li", "ls => ls.length") == 2  # both classes
    attention = frame_of(page, "/pages/attention")
    assert attention.eval_on_selector("#kind", "s => s.value") == "encoder self"
    assert not errors and not blocked, (errors, blocked)


def test_a_history_shows_its_recommendations_and_attention(browser, base_url):  # noqa: F811
    import httpx

    want = httpx.post(f"{base_url}/v1/recommend", json={"histories": [[100, 101, 102]]}).json()
    page, errors, blocked = open_home(browser, base_url)
    choose(page, "items")
    page.fill("#text", "100 101 102")
    page.click("#go")
    first = want["results"][0]["items"][0]
    page.wait_for_function(f"document.getElementById('output').textContent.startsWith('{first}')")
    attention = frame_of(page, "/pages/attention")
    assert attention.eval_on_selector("#kind", "s => s.value") == "decoder self"
    assert not errors and not blocked, (errors, blocked)


def test_a_client_that_leaves_a_stream_stops_its_generation(base_url):
    import httpx

    def abandoned() -> float:
        for line in httpx.get(f"{base_url}/metrics").text.splitlines():
            if line.startswith("qkv_streams_abandoned_total "):
                return float(line.split()[1])
        return 0.0

    before = abandoned()
    body = {"prompt": "ROMEO:", "max_new_tokens": 1024, "stream": True, "strategy": "greedy"}
    with httpx.stream("POST", f"{base_url}/v1/generate", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one token is enough: leave
    for _ in range(100):  # the model thread notices at its next token
        if abandoned() == before + 1:
            break
        time.sleep(0.05)
    assert abandoned() == before + 1
    done = httpx.post(
        f"{base_url}/v1/generate", json={**body, "stream": False, "max_new_tokens": 5}
    )
    assert done.status_code == 200 and done.json()["tokens"] == 5  # the model thread is free
