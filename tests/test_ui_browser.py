"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright through
the system browser (`./dev test` installs it). A real server on a real socket answers, the
tiny real model streams in the playground, and a screenshot of each page is kept in
tests/artifacts/ui/ (ignored by git)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from ui_support import Site, routes_site, site

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts" / "ui"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TINY = "smollm2-135m"
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if shutil.which("chromium") is None and not Path(CHROMIUM).exists():
        pytest.fail(
            "the dashboard's browser tests need Debian's Chromium: ./dev test installs it "
            "(apt-get install -y chromium)"
        )
    with sync_playwright() as playwright:
        # Playwright starts the browser with a new, empty profile of its own.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with site(tmp_path_factory.mktemp("ui-browser")) as running:
        client = openai.OpenAI(
            base_url=running.root + "/v1", api_key=running.user_key, max_retries=0
        )
        long = "a much longer prompt, which the route sends to the dear model"
        for name, prompt in [
            *(("short-first", p) for p in ("hi", long, "ok", "yes", long)),
            ("shouter", "swim"),
        ]:
            client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": prompt}]
            )
        yield running


@pytest.fixture
def page(browser: Browser, server: Site) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    try:
        yield page
    finally:
        context.close()


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def signed_in(page: Page, server: Site, path: str = "/ui/") -> Page:
    page.goto(server.root + path)
    page.fill("input[name=key]", server.admin_key)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(re.escape(server.root + path) + r"$"))
    return page


def test_a_page_without_the_cookie_redirects_to_sign_in(page: Page, server: Site) -> None:
    page.goto(server.root + "/ui/requests")
    assert "/ui/login?next=" in page.url
    expect(page.locator("h1")).to_have_text("Sign in")
    shot(page, "login")


def test_sign_in_and_the_overview_totals_equal_the_traces(page: Page, server: Site) -> None:
    signed_in(page, server, "/ui/?window=all")
    calls = server.engine.traces.calls()
    expect(page.locator("[data-figure=calls]")).to_have_text(str(len(calls)))
    tokens = sum(c.input_tokens + c.output_tokens for c in calls)
    expect(page.locator("[data-figure=tokens]")).to_have_text(str(tokens))
    cost = float(page.locator("[data-figure=cost]").get_attribute("data-value") or "nan")
    assert cost == pytest.approx(sum(c.cost_usd for c in calls), abs=1e-12)
    expect(page.locator(".chart canvas").first).to_be_visible()  # uPlot drew the series
    shot(page, "overview")


def test_open_a_request_and_see_its_decision(page: Page, server: Site) -> None:
    signed_in(page, server, "/ui/requests")
    page.select_option("select[name=route]", "short-first")
    expect(page).to_have_url(re.compile(r"route=short-first"))  # htmx swapped the log in
    expect(page.locator("#log tbody tr")).to_have_count(5)
    shot(page, "requests")
    page.locator("#log tbody tr", has_text="dear").locator("a").first.click()
    decision = page.locator("#decision")
    expect(decision).to_contain_text("long prompt: dear is expected to do")
    expect(decision.locator("tr.chosen")).to_contain_text("dear")
    shot(page, "request")


def test_open_a_recorded_request_in_the_playground_and_send_it_again(
    page: Page, server: Site
) -> None:
    signed_in(page, server, "/ui/requests?route=short-first")
    page.locator("#log tbody tr", has_text="cheap").locator("a").first.click()
    page.locator("#replay a.button").click()
    page.wait_for_url(re.compile(r"/ui/playground\?target=short-first&recording=\d+$"))
    recording_id = int(page.url.rsplit("=", 1)[1])
    (recorded,) = [
        r for r in server.engine.traces.recordings("short-first") if r.id == recording_id
    ]
    expect(page.locator("textarea[name=prompt]")).to_have_value(recorded.input)
    expect(page.locator("select[data-slot='0']")).to_have_value("short-first")
    shot(page, "playground-recorded")
    page.click("#playground button[type=submit]")
    answer = page.locator(".answer").first
    expect(answer).to_have_class(re.compile(r"\bdone\b"))
    expect(answer.locator(".text")).to_have_text("cheap answer")
    expect(answer.locator(".prompt")).to_have_text(recorded.input)


def test_stream_an_answer_from_the_tiny_model(page: Page, server: Site) -> None:
    signed_in(page, server, "/ui/playground")
    page.select_option("select[data-slot='0']", TINY)
    page.fill("textarea[name=prompt]", "Say hello in three words.")
    page.click("#playground details summary")
    page.fill("input[name=max_tokens]", "12")
    page.click("#playground button[type=submit]")
    answer = page.locator(".answer").first
    expect(answer).to_have_class(re.compile(r"\bdone\b"), timeout=WAIT_MS)
    assert answer.locator(".text").inner_text().strip()
    expect(answer.locator(".figures-line")).to_contain_text(TINY)
    expect(answer.locator(".figures-line")).to_contain_text(" out")
    shot(page, "playground")


def test_compare_two_models_on_one_prompt(page: Page, server: Site) -> None:
    signed_in(page, server, "/ui/playground")
    page.select_option("select[data-slot='0']", TINY)
    page.select_option("select[data-slot='1']", "shouter")
    page.fill("textarea[name=prompt]", "What is the capital of France?")
    page.click("#playground details summary")
    page.fill("input[name=max_tokens]", "16")
    page.click("#playground button[type=submit]")
    answers = page.locator(".answer")
    expect(answers).to_have_count(2)
    for answer in answers.all():
        expect(answer).to_have_class(re.compile(r"\bdone\b"), timeout=WAIT_MS)
    expect(page.locator(".answer[data-target=shouter] .text")).to_have_text(
        "WHAT IS THE CAPITAL OF FRANCE?"
    )
    expect(page.locator(f".answer[data-target='{TINY}'] .figures-line")).to_contain_text(TINY)
    shot(page, "compare")


def test_a_script_prompt_stays_text(page: Page, server: Site) -> None:
    signed_in(page, server, "/ui/playground")
    page.select_option("select[data-slot='0']", "shouter")
    prompt = "<script>window.pwned = 1</script><b>bold</b>"
    page.fill("textarea[name=prompt]", prompt)
    page.click("#playground button[type=submit]")
    answer = page.locator(".answer").first
    expect(answer).to_have_class(re.compile(r"\bdone\b"))
    expect(answer.locator(".prompt")).to_have_text(prompt)
    expect(answer.locator(".text")).to_have_text(prompt.upper())
    assert answer.locator("script, b").count() == 0
    assert page.evaluate("window.pwned") is None


def test_start_a_pipeline_run_and_see_it_finish_live(page: Page, server: Site) -> None:
    signed_in(page, server, "/ui/runs")
    form = page.locator("form[data-pipeline=shout]")
    form.locator("input[name='input.text']").fill("swim little fish")
    form.locator("button[type=submit]").click()
    page.wait_for_url(re.compile(r"/ui/runs/[\w-]+$"))
    live = page.locator("#live")
    expect(live).to_be_visible()  # the run is still going when its page opens
    expect(live.locator(".events li").first).to_be_visible()
    shot(page, "run-live")
    expect(page.locator("#run-status")).to_have_text("ok", timeout=WAIT_MS)
    page.wait_for_load_state("load")
    expect(page.locator(".waterfall .bar-row")).to_have_count(4)
    expect(page.locator("#live")).to_have_count(0)  # reloaded once it finished
    shot(page, "run")


def test_create_and_revoke_a_key(page: Page, server: Site) -> None:
    signed_in(page, server, "/ui/keys")
    page.fill("form.inline input[name=name]", "browser-made")
    page.fill("form.inline input[name=budget]", "0.25")
    page.click("form.inline button[type=submit]")
    secret = page.locator("#created [data-secret]")
    expect(secret).to_have_text(re.compile(r"^sk-shoal-"))
    key = secret.inner_text()
    client = openai.OpenAI(base_url=server.root + "/v1", api_key=key, max_retries=0)
    assert client.models.list().data
    shot(page, "keys")
    page.locator("tr[data-key=browser-made] button").click()
    expect(page.locator("tr[data-key=browser-made]")).to_have_class("revoked")
    expect(page.locator("#created")).to_have_count(0)  # shown once
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_the_routes_and_runs_pages_render(page: Page, server: Site) -> None:
    signed_in(page, server, "/ui/routes")
    expect(page.locator("main")).to_contain_text("short-first")
    shot(page, "routes")
    page.goto(server.root + "/ui/runs")
    expect(page.locator("h1")).to_have_text("Runs")
    shot(page, "runs")


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Iterator[Site]:
    with routes_site(tmp_path_factory.mktemp("ui-browser-routes"), smollm2_gguf) as running:
        yield running


def test_a_calibrated_route_shows_its_target_and_cost_quality_curve(
    page: Page, routed: Site
) -> None:
    signed_in(page, routed, "/ui/routes")
    smart = page.locator("[data-route=smart]")
    expect(smart.locator("[data-fact=target]")).to_have_text("≥ 90% of the best model's quality")
    expect(smart.locator("[data-fact=setting]")).to_contain_text("cost weight")
    expect(smart.locator("[data-chart=route] canvas").first).to_be_visible()  # uPlot drew it
    expect(page.locator("[data-route=fresh] [data-fact=uncalibrated]")).to_contain_text(
        "shoal route calibrate fresh"
    )
    expect(page.locator("[data-route=labels] [data-fact=shadow]")).to_contain_text(
        "2 requests compared"
    )
    shot(page, "routes-calibrated")


@pytest.mark.parametrize("path", ["/ui/", "/ui/requests", "/ui/playground", "/ui/keys", "/ui/runs"])
def test_pages_fit_a_phone_screen(browser: Browser, server: Site, path: str) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    try:
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        signed_in(page, server, path)
        # Wide tables scroll inside their cards; the page itself never scrolls sideways.
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        shot(page, "phone-" + (path.strip("/").replace("/", "-") or "ui"))
    finally:
        context.close()
