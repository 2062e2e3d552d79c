"""`chat.py --web` as its users meet it: the server on a free localhost port driven by gradio_client
(answers equal chat.py's in the terminal, bad uploads, two tabs at once), and the real page in
headless Chromium (Playwright, Debian's `chromium`). The browser test saves its screenshot to
$WEB_SCREENSHOT if set: `WEB_SCREENSHOT=notes/web.png python -m pytest tests/test_web.py -k browser`
redraws the README's picture."""

import os
import random
import shutil
import socket
import subprocess
import sys

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from test_cli import ROOT, assert_one_line_error, bad_images, run  # noqa: F401 (bad_images: a fixture)

from minivlmamba.shapes import make_scene, render

CHROMIUM = shutil.which("chromium")
QUESTION = "Describe the image."  # a caption: an answer of several tokens, so it streams in pieces


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("web") / "tiny"
    run("train.py", "--steps", "60", "--log-every", "60", "--eval-per-family", "1", "--tower-steps", "10", "--out", out)
    return out


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """`python chat.py --web` on a free port -> the URL it prints."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("server") / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(ROOT / "chat.py"), "--web", "--ckpt", str(checkpoint),
                                 "--port", str(port), "--max-new-tokens", "24"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
    line = proc.stdout.readline()  # "talk to CKPT at URL (Ctrl-C stops)" once it serves
    assert line.startswith("talk to "), log.read_text()
    yield line.split(" at ")[1].split()[0]
    proc.terminate()
    proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()  # bad input never reached the server as a crash


def scene(path, seed):
    rng = random.Random(seed)
    render(make_scene(rng, held_out=True), rng).save(path)
    return path


def terminal(checkpoint, image, *questions):
    """The answers chat.py gives in the terminal: -p for one question, the interactive mode for more."""
    if len(questions) == 1:
        return [run("chat.py", "--ckpt", checkpoint, "--image", image, "--max-new-tokens", "24",
                    "-p", questions[0]).stdout.removesuffix("\n")]
    said = run("chat.py", "--ckpt", checkpoint, "--image", image, "--max-new-tokens", "24",
               input="".join(q + "\n" for q in questions) + "quit\n").stdout
    return [answer.removesuffix("\n") for answer in said.split("> ")[1:-1]]  # "> answer\n" a question


def tab(url):
    return Client(url, verbose=False, download_files=False)


def answers(history):
    return [m["content"][0]["text"] for m in history if m["role"] == "assistant"]


def ask(client, question):
    return answers(client.predict(question=question, api_name="/ask")[1])[-1]


def test_answer_equals_the_terminals_and_streams(server, checkpoint, tmp_path):
    image = scene(tmp_path / "scene.png", seed=1)
    client = tab(server)
    shown, history = client.predict(handle_file(image), api_name="/upload")
    assert shown["label"] == "scene.png" and history == []
    job = client.submit(question=QUESTION, api_name="/ask")
    (answer,) = answers(job.result()[1])
    assert [answer] == terminal(checkpoint, image, QUESTION)
    streamed = [answers(history)[-1] for _, history in job.outputs()]
    assert all(answer.startswith(partial) for partial in streamed) and streamed[-1] == answer
    assert len(set(streamed)) > min(2, len(answer.split()))  # "", (some of the answer,) all of it: in pieces


def test_new_scene_is_the_one_chat_py_demo_draws_again(server, checkpoint, tmp_path):
    client = tab(server)
    shown, _ = client.predict(api_name="/new_scene")
    seed = shown["label"].split("--seed ")[1].split()[0]  # "shapes scene 1234 (python chat.py --demo --seed 1234 ...)"
    answer = ask(client, QUESTION)
    said = run("chat.py", "--ckpt", checkpoint, "--demo", "--demo-file", tmp_path / "d.png", "--seed", seed,
               "--max-new-tokens", "24", "-p", QUESTION).stdout
    assert answer == said.removesuffix("\n")


def test_bad_uploads_give_a_message_and_the_next_request_works(server, checkpoint, bad_images, tmp_path):
    image = scene(tmp_path / "scene.png", seed=2)
    client = tab(server)
    client.predict(handle_file(image), api_name="/upload")
    expected = terminal(checkpoint, image, QUESTION, QUESTION)
    assert ask(client, QUESTION) == expected[0]
    for case in ("empty", "text", "truncated", "bomb"):
        path, words = bad_images[case]
        with pytest.raises(AppError, match=words) as error:
            client.predict(handle_file(path), api_name="/upload")
        assert str(error.value).startswith(path.name) and "/tmp" not in str(error.value)  # the user's name
    assert ask(client, QUESTION) == expected[1]  # the conversation went on about the good image


def test_a_taken_port_is_a_one_line_error(server, checkpoint):
    port = server.rsplit(":", 1)[1].strip("/")
    result = run("chat.py", "--web", "--ckpt", checkpoint, "--port", port, check=False)
    assert_one_line_error(result, "cannot serve", port)


def test_two_tabs_keep_their_own_conversations(server, checkpoint, tmp_path):
    images = scene(tmp_path / "a.png", seed=3), scene(tmp_path / "b.png", seed=4)
    a, b = tab(server), tab(server)
    a.predict(handle_file(images[0]), api_name="/upload")
    with pytest.raises(AppError, match="no image yet"):  # b's tab has no image, whatever a's has
        b.predict(question=QUESTION, api_name="/ask")
    b.predict(handle_file(images[1]), api_name="/upload")
    first = [client.submit(question=QUESTION, api_name="/ask") for client in (a, b)]  # queued together
    first = [answers(job.result()[1])[-1] for job in first]
    second = [ask(a, "How many shapes are there?"), ask(b, "Is there a red circle?")]
    assert [first[0], second[0]] == terminal(checkpoint, images[0], QUESTION, "How many shapes are there?")
    assert [first[1], second[1]] == terminal(checkpoint, images[1], QUESTION, "Is there a red circle?")
    b.predict(api_name="/clear")
    assert ask(b, QUESTION) == first[1]  # cleared: the same image, a fresh conversation


@pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium: apt-get install chromium")
def test_the_page_in_a_browser(server, checkpoint, bad_images, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # how long to wait for the page, not a timing check: 2 busy cores
    image = scene(tmp_path / "scene.png", seed=5)
    (expected,) = terminal(checkpoint, image, QUESTION)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        elsewhere = []  # requests the page makes to anything but our server
        page.on("request", lambda r: None if r.url.startswith(server) else elsewhere.append(r.url))
        page.goto(server)
        expect(page.get_by_text("trained from scratch on the built-in shapes scenes")).to_be_visible()
        with page.expect_file_chooser() as chooser:
            page.get_by_role("button", name="Upload an image").click()
        chooser.value.set_files(image)
        expect(page.get_by_text("scene.png", exact=True)).to_be_visible()  # the image's label once it is read
        box = page.get_by_placeholder("Ask about the image")
        box.fill(QUESTION)
        box.press("Enter")
        expect(page.get_by_test_id("bot")).to_have_text(expected)  # waits while the answer streams in
        page.screenshot(path=os.environ.get("WEB_SCREENSHOT", tmp_path / "web.png"))
        box.fill("Is there a red circle? " * 30)
        box.press("Enter")
        expect(page.get_by_text("truncated to the model's budget")).to_be_visible()
        with page.expect_file_chooser() as chooser:
            page.get_by_role("button", name="Upload an image").click()
        chooser.value.set_files(bad_images["text"][0])
        expect(page.get_by_text("notes.png: not a readable image")).to_be_visible()
        browser.close()
    assert elsewhere == []  # no CDN, no telemetry: the page works offline
