"""`nanokimi serve` as its users meet it: the official `openai` client (and raw HTTP where a client would not send
it) against a running server process; a scripted model for tool calls; a load test; the chat page in a real
headless browser."""

import json
import random
import shutil
import signal
import subprocess
import threading
import time

import httpx
import openai
import pytest
import torch

from nanokimi import calculator
from nanokimi.chat_template import CHAT_TOKENS, IM_END, encode
from nanokimi.checkpoint import load_model
from nanokimi.cli import main
from tests.conftest import NANOKIMI, assert_greedy, free_port, run_cli, teacher_forced_logits, train_args
from tests.test_chat import ScriptedModel, conversation, encode_reply, train_on_chat, write_jsonl

SYSTEM = {"role": "system", "content": "Be brief."}


class Served:
    """`nanokimi serve RUN FLAGS` in its own process, on a free port; `stop()` sends SIGTERM."""

    def __init__(self, run, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [*NANOKIMI, "serve", str(run), f"--port={self.port}", *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 120
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read()
            try:
                self.health = httpx.get(self.url + "/health").json()
                break
            except httpx.TransportError:
                assert time.time() < deadline, "the server did not come up"
                time.sleep(0.2)
        self.name = self.health["model"]

    def client(self, api_key="none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def chat(self, messages, **kw):
        return self.client().chat.completions.create(model=self.name, messages=messages, **kw)

    def rss_kib(self):
        status = open(f"/proc/{self.proc.pid}/status").read()
        return int(status.split("VmRSS:")[1].split()[0])

    def stop(self):
        """SIGTERM; returns (exit code, seconds to exit, stderr). After its graceful shutdown the server exits as the
        signal's default would (uvicorn re-raises it): -SIGTERM here, 143 in a shell."""
        start = time.time()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        return code, time.time() - start, self.proc.stderr.read()


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = root / "data"
    main(
        [
            "prepare",
            "chat",
            f"--input={write_jsonl(root / 'c.jsonl', [conversation(i) for i in range(80)])}",
            f"--out={data}",
            "--no_progress",
        ]
    )
    return train_on_chat(data, "run")


@pytest.fixture(scope="module")
def long_run(char_data, tmp_path_factory):
    """A base model with a 4096-token context and no document boundary: its completions run to max_tokens, so a
    request holds its slot for seconds."""
    out = tmp_path_factory.mktemp("long") / "run"
    main(
        [
            *train_args(char_data, out),
            "--max_iters=1",
            "--max_position_embeddings=4096",
        ]
    )
    return out


def long_completion(served, max_tokens=4000):
    return served.client().completions.create(model=served.name, prompt="ROMEO:", max_tokens=max_tokens, stream=True)


def wait_until(condition, what, timeout=30):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(chat_run):
    served = Served(chat_run)
    yield served
    code, _, stderr = served.stop()
    assert code == -signal.SIGTERM and "Traceback" not in stderr, stderr  # no request, good or bad, left a traceback


def streamed_text(stream):
    """The content of a streamed chat completion, and its finish_reason."""
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_replies_are_equal_streaming_and_not_and_equal_to_nanokimi_chats(server, chat_run):
    messages = [SYSTEM, {"role": "user", "content": "say 3"}]
    whole = server.chat(messages, temperature=0, max_tokens=24)
    reply = whole.choices[0].message
    assert whole.choices[0].finish_reason in ("stop", "length") and reply.role == "assistant" and reply.content
    text, finish = streamed_text(server.chat(messages, temperature=0, max_tokens=24, stream=True))
    assert (text, finish) == (reply.content, whole.choices[0].finish_reason)
    model, tokenizer, _ = load_model(chat_run)
    prompt = encode(tokenizer, messages, add_generation_prompt=True)[0]
    assert whole.usage.prompt_tokens == len(prompt)
    result = run_cli("chat", chat_run, "-m", "say 3", "--system=Be brief.", "--temperature=0", "--max_new_tokens=24")
    assert result.returncode == 0 and result.stdout == reply.content + "\n", result.stderr


def test_sixteen_concurrent_streams_each_equal_its_request_alone(server, chat_run):
    model, tokenizer, _ = load_model(chat_run)
    requests = [[SYSTEM, {"role": "user", "content": f"say {i}"}] for i in range(16)]
    alone = [server.chat(m, temperature=0, max_tokens=20).choices[0].message.content for m in requests]
    together = [None] * len(requests)

    def client(i):
        together[i] = streamed_text(server.chat(requests[i], temperature=0, max_tokens=20, stream=True))[0]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for messages, a, b in zip(requests, alone, together):
        prompt = encode(tokenizer, messages, add_generation_prompt=True)[0]
        assert b is not None
        if a != b:  # batched rounding may break a near-tie the other way, nothing more
            end = tokenizer.special_token_id(IM_END)
            assert_first_difference_is_a_tie(model, prompt, tokenizer.encode(a), tokenizer.encode(b), end)


def assert_first_difference_is_a_tie(model, prompt, a, b, end):
    """Two greedy replies a and b (ids) part only where the model's top two logits are within rounding: b's choice
    there (its next token, or `end` where it stopped) is greedy under the logits after the common prefix too."""
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    seq = torch.tensor([prompt + a[:k] + [end]])
    assert_greedy(torch.tensor([[b[k] if k < len(b) else end]]), teacher_forced_logits(model, seq, seq.shape[1] - 1))


def test_bad_requests_get_openai_errors_with_4xx(server):
    client, user = server.client(), [SYSTEM, {"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=user)
    for kw, match in [
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"max_tokens": 10**6}, "maximum context length"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 1e-6}, "temperature must be 0"),
        ({"n": 2}, "n=2 is not supported"),
        ({"messages": [SYSTEM, {"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
        ({"messages": [SYSTEM, {"role": "user", "content": "x" * 1000}]}, "maximum context length"),
        ({"messages": [{"role": "tool", "tool_call_id": "functions.f:0", "content": "1"}]}, "no earlier assistant"),
    ]:
        with pytest.raises(openai.BadRequestError, match=match) as raised:
            client.chat.completions.create(model=server.name, **({"messages": user} | kw))
        assert set(raised.value.body) == {"message", "type", "param", "code"}  # OpenAI's error object
    url = server.url + "/v1/chat/completions"
    for body, status in [(b"{not json", 400), (b'{"model": "x"', 400), (b"[]", 400)]:
        response = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == status and "message" in response.json()["error"], response.text
    curl_d = {"Content-Type": "application/x-www-form-urlencoded"}  # what `curl -d` sends without -H
    form = httpx.post(url, content=json.dumps({"model": server.name, "messages": []}), headers=curl_d)
    assert form.status_code == 400 and "Content-Type: application/json" in form.json()["error"]["message"]
    big = json.dumps({"model": server.name, "prompt": "x" * (2 << 20)})
    response = httpx.post(server.url + "/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert httpx.get(server.url + "/v1/nothing").status_code == 404


def test_a_client_that_goes_away_frees_its_slot_and_a_full_queue_answers_429(long_run):
    served = Served(long_run, "--slots=1", "--max_waiting=1")
    try:
        stream = long_completion(served)
        next(iter(stream))  # the first chunk: the request holds the one slot
        waiting = threading.Thread(target=lambda: list(long_completion(served, max_tokens=5)))
        waiting.start()  # it waits in line, the one place there is
        wait_until(lambda: httpx.get(served.url + "/health").json()["waiting"], "the second request to wait")
        with pytest.raises(openai.RateLimitError, match="busy"):
            long_completion(served)
        stream.close()  # mid-reply: its slot is free at the engine's next step, and the waiting one runs
        waiting.join(30)
        assert not waiting.is_alive()
        health = httpx.get(served.url + "/health").json()
        assert health["active"] == health["waiting"] == 0, health
    finally:
        code, _, stderr = served.stop()
    assert code == -signal.SIGTERM and "Traceback" not in stderr, stderr


def test_an_api_key_is_required_when_set(chat_run):
    served = Served(chat_run, "--api_key=s3cret")
    try:
        user = [SYSTEM, {"role": "user", "content": "hi"}]
        for key in ("none", "wrong"):
            with pytest.raises(openai.AuthenticationError):
                served.client(key).chat.completions.create(model=served.name, messages=user, max_tokens=2)
        assert served.client("s3cret").chat.completions.create(model=served.name, messages=user, max_tokens=2)
        assert httpx.get(served.url + "/health").status_code == 200  # the health check needs no key
    finally:
        served.stop()


def test_sigterm_ends_the_streams_in_flight_and_exits_within_seconds(long_run):
    served = Served(long_run)
    got, errors = threading.Barrier(4), []

    def client():
        try:
            for i, _ in enumerate(long_completion(served)):
                if i == 0:
                    got.wait(30)
        except openai.APIError as e:  # the server said it is shutting down, as an error event
            errors.append(str(e))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    got.wait(60)  # three streams are running
    code, seconds, stderr = served.stop()
    for t in threads:
        t.join(30)
    assert code == -signal.SIGTERM and seconds < 10 and "Traceback" not in stderr, (code, seconds, stderr)
    assert not any(t.is_alive() for t in threads)
    assert len(errors) == 3 and all("shutting down" in e for e in errors), errors


def test_a_base_model_completes_text_and_refuses_chat(made):
    served = Served(made / "run")
    try:
        with pytest.raises(openai.BadRequestError, match="base model"):
            served.chat([{"role": "user", "content": "hi"}])
        client = served.client()
        whole = client.completions.create(model=served.name, prompt="ROMEO:", max_tokens=12, temperature=0)
        streamed = "".join(
            c.choices[0].text
            for c in client.completions.create(
                model=served.name, prompt="ROMEO:", max_tokens=12, temperature=0, stream=True
            )
            if c.choices
        )
        assert streamed == whole.choices[0].text and whole.choices[0].finish_reason == "length"
        assert whole.usage.completion_tokens == 12
        model, tokenizer, _ = load_model(made / "run")
        seq = torch.tensor([tokenizer.encode("ROMEO:" + whole.choices[0].text)])
        assert_greedy(seq[:, 6:], teacher_forced_logits(model, seq, 6))
        stopped = client.completions.create(
            model=served.name, prompt="ROMEO:", max_tokens=12, temperature=0, stop=[whole.choices[0].text[3:5]]
        )
        assert stopped.choices[0].text == whole.choices[0].text[:3] and stopped.choices[0].finish_reason == "stop"
    finally:
        served.stop()


def test_tool_calls_round_trip_through_the_template(tmp_path):
    """A scripted model (tool calls a tiny model would not make) served in this process: the client gets the call in
    OpenAI's shape, streaming and not, sends the result back, and the model reads exactly the template's tokens."""
    import uvicorn

    from nanokimi.engine import Engine
    from nanokimi.server import Served as App
    from nanokimi.server import build_app
    from nanokimi.tokenizer import HFTokenizer

    tokenizer = HFTokenizer.train(
        ["1234 * 5678 = 7006652. functions.calculator:0 expression"] * 5, 400, True, CHAT_TOKENS
    )
    call = (
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.calculator:0<|tool_call_argument_begin|>"
        '{"expression": "1234 * 5678"}<|tool_call_end|><|tool_calls_section_end|>'
    )
    model = ScriptedModel(tokenizer, [call, call, "1234 * 5678 = 7006652."])
    read = []
    forward = model.forward
    model.forward = lambda idx: read.append(idx[0].tolist()) or forward(idx)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(build_app(App(tokenizer, "scripted", Engine(model))), port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, "the in-process server to start")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        messages = [{"role": "user", "content": "What is 1234 * 5678?"}]
        tools = [calculator.DEFINITION]
        whole = client.chat.completions.create(model="scripted", messages=messages, tools=tools, temperature=0)
        assert whole.choices[0].finish_reason == "tool_calls"
        (tool_call,) = whole.choices[0].message.tool_calls
        assert (tool_call.id, tool_call.function.name) == ("functions.calculator:0", "calculator")
        assert json.loads(tool_call.function.arguments) == {"expression": "1234 * 5678"}
        chunks = list(
            client.chat.completions.create(model="scripted", messages=messages, tools=tools, temperature=0, stream=True)
        )
        deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert [d[0].function.arguments for d in deltas] == [tool_call.function.arguments]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        messages += [
            whole.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": tool_call.id, "content": calculator.call(tool_call.function.arguments)},
        ]
        final = client.chat.completions.create(model="scripted", messages=messages, tools=tools, temperature=0)
        assert final.choices[0].message.content == "1234 * 5678 = 7006652."
        assert (
            read[-len(encode_reply(tokenizer, final.choices[0].message.content))]
            == encode(tokenizer, messages, tools, add_generation_prompt=True)[0]
        )  # the model read the conversation, tool result included, as the chat template writes it
    finally:
        server.should_exit = True
        thread.join(10)


def test_load_many_clients_some_leaving_some_malformed_leave_no_errors_or_slots(server):
    """N clients for M seconds: whole streams, streams dropped after a chunk, malformed bodies. Every answer is 2xx
    or 4xx, every slot is free after, and the server's memory stays flat."""
    url, name = server.url + "/v1/chat/completions", server.name
    statuses, stop = [], time.time() + 8

    def client(seed):
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as http:
            while time.time() < stop:
                kind = rng.choice(["whole", "leave", "malformed"])
                body = {"model": name, "messages": [SYSTEM, {"role": "user", "content": f"say {rng.randint(0, 99)}"}]}
                if kind == "malformed":
                    response = http.post(url, content=b'{"model": ' + name.encode() + b", messages: [}")
                    statuses.append(response.status_code)
                    continue
                with http.stream("POST", url, json=body | {"stream": True, "max_tokens": 24}) as response:
                    statuses.append(response.status_code)
                    for i, _ in enumerate(response.iter_lines()):
                        if kind == "leave" and i == 1:
                            break

    def round_of_load(seed):
        threads = [threading.Thread(target=client, args=(seed * 100 + i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)

    round_of_load(0)  # warm: the allocator's pools are in place
    before = server.rss_kib()
    stop = time.time() + 8
    round_of_load(1)
    assert statuses and all(200 <= s < 500 for s in statuses), sorted(set(statuses))
    assert statuses.count(400) and statuses.count(200)
    idle = lambda: (h := httpx.get(server.url + "/health").json())["active"] == h["waiting"] == 0  # noqa: E731
    wait_until(idle, "every slot to be free", 10)
    assert server.rss_kib() < before * 1.1 + 10_000, (before, server.rss_kib())


def find_browser():
    for browser, driver in (("chromium", "chromedriver"), ("chromium-browser", "chromedriver")):
        if shutil.which(browser) and shutil.which(driver):
            return shutil.which(browser), shutil.which(driver)
    return None


@pytest.mark.skipif(find_browser() is None, reason="needs a browser: apt-get install chromium chromium-driver")
def test_the_chat_page_streams_a_reply_in_a_real_browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    page = webdriver.Chrome(service=Service(driver), options=options)
    try:
        page.get(server.url + "/")
        WebDriverWait(page, 30).until(lambda p: server.name in p.find_element(By.ID, "model").text)
        page.find_element(By.TAG_NAME, "summary").click()
        page.find_element(By.ID, "system").send_keys("Be brief.")
        temperature = page.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("0")
        page.find_element(By.ID, "input").send_keys("say 3")
        page.find_element(By.ID, "send").click()
        done = '.assistant[data-done="true"], .error[data-done="true"]'
        reply = WebDriverWait(page, 60).until(lambda p: p.find_elements(By.CSS_SELECTOR, done))[0]
        expected = server.chat([SYSTEM, {"role": "user", "content": "say 3"}], temperature=0)
        assert reply.get_attribute("class") == "message assistant", reply.text
        assert reply.get_attribute("textContent") == expected.choices[0].message.content
        assert "tokens/s" in page.find_element(By.ID, "stats").text
        page.find_element(By.ID, "reset").click()
        assert page.find_elements(By.CSS_SELECTOR, ".message") == []
    finally:
        page.quit()


def test_serve_refuses_bad_flags_in_one_line(chat_run):
    for flags, message in [(["--slots=0"], "need --slots >= 1"), (["--port=70000"], "--port must be in 0..65535")]:
        result = run_cli("serve", chat_run, *flags)
        assert result.returncode == 2 and result.stderr.startswith(f"error: {message}"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
