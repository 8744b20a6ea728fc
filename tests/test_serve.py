"""sample.py --serve: the slider page of a tiny finished run, driven over HTTP, and in a real browser (headless
Chromium from Debian's packages, which .ci/run installs), talking the DevTools protocol over a pipe (no extra
package): it loads the page, clicks the slider, and the image changes."""

import base64
import io
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import sample
import train

TINY = [
    "--backbone",
    "sd35",
    "--tiny",
    "--pretrain-steps",
    "3",
    "--pretrain-batch",
    "8",
    "--prompts-per-step",
    "2",
    "--prefs-per-prompt",
    "2",
    "--group-size",
    "2",
    "--sample-steps",
    "2",
    "--eval-points",
    "3",
    "--eval-prompts",
    "2",
    "--lora-rank",
    "4",
    "--lora-alpha",
    "8",
    "--batch",
    "4",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    train.main(TINY + ["--steps", "2", "--out", str(d / "run"), "--cache", str(d / "cache")])
    args = sample.cli().parse_args(["--run", str(d / "run"), "--serve", "--port", "0"])
    pipe, backbone, spec, objectives, _ = sample.prepare(args)
    last = pipe.net.pref_slider.mlp[-1]  # the slider vector's last layer starts at zero: make w matter visibly
    with torch.no_grad():
        last.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    slider = sample.Slider(pipe, args, sample.run_info(pipe, backbone, spec, objectives, args))
    srv = sample.make_server(slider, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", slider, d / "run"
    srv.shutdown()
    srv.server_close()


def post(url, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/render", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def test_serve_over_http(server):
    url, slider, _ = server
    with urllib.request.urlopen(url + "/info", timeout=10) as r:
        info = json.loads(r.read())
    assert info["backbone"] == "sd35" and info["objectives"] == ["tiny_photo", "tiny_sketch"]
    assert info["step"] == 2 and isinstance(info["hypervolume"], float) and info["pref_dim"] == 2
    with urllib.request.urlopen(url + "/", timeout=10) as r:
        page = r.read().decode()
    assert '<input id="prompt"' in page and '"tiny_photo"' in page and "__INFO__" not in page
    # two w: two different images; the same w again comes from the cache, byte for byte
    a = post(url, dict(prompt="a red circle", seed=3, pref=[1.0, 0.0]))
    b = post(url, dict(prompt="a red circle", seed=3, pref=[0.0, 1.0]))
    assert a[0] == b[0] == 200 and a[2]["Content-Type"] == "image/png" and a[1][:4] == b"\x89PNG"
    assert a[2]["X-Cache"] == b[2]["X-Cache"] == "miss" and a[1] != b[1]
    again = post(url, dict(prompt="a red circle", seed=3, pref=[1.0, 0.0]))
    assert again[0] == 200 and again[2]["X-Cache"] == "hit" and again[1] == a[1]
    # what sample.py draws for the same prompt, seed and w
    import numpy as np
    from PIL import Image

    ours = np.asarray(Image.open(io.BytesIO(a[1])))
    cond, _ = slider.pipe.conditions(["a red circle"])
    x = slider.pipe.generate(
        cond, None, [1.0, 0.0], slider.args.steps, 3, 32, 32, 1.0, slider.args.solver, slider.args.shift
    )[0]
    assert np.abs(ours.astype(int) - np.asarray(sample.to_pil(x)).astype(int)).max() == 0
    # the last request wins: an older request of the same page is dropped, not sampled
    assert post(url, dict(prompt="a blue ring", seed=1, pref=[0.5, 0.5], client="c", seq=5))[0] == 200
    assert post(url, dict(prompt="a blue ring", seed=1, pref=[0.4, 0.6], client="c", seq=3))[0] == 409
    # bad requests: a clear 4xx each, and the server stays up
    bad = [
        (dict(prompt="a red circle", pref=[0.7, 0.7]), 400, "simplex"),
        (dict(prompt="a red circle", pref=[-0.5, 1.5]), 400, "simplex"),
        (dict(prompt="a red circle", pref=[1.0]), 400, "list of 2"),
        (dict(prompt="  ", pref=[1.0, 0.0]), 400, "prompt"),
        (dict(prompt="a red circle", pref=[1.0, 0.0], seed="x"), 400, "seed"),
        (dict(prompt="a red circle", pref=[1.0, 0.0], source="not a data url"), 400, "data URL"),
        (None, 400, "JSON object"),
    ]
    for body, code, msg in bad:
        status, out, _ = post(url, body)
        assert status == code and msg in json.loads(out)["error"], (body, out)
    assert post(url, None, raw=b"{not json")[0] == 400
    big = post(url, None, raw=b"x" * (sample.MAX_UPLOAD + 1))
    assert big[0] == 413 and "at most" in json.loads(big[1])["error"]
    for path in ("/nope",):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + path, timeout=10)
        assert e.value.code == 404
    with urllib.request.urlopen(url + "/info", timeout=10) as r:
        assert r.status == 200  # still serving


class DevTools:
    """Chromium's DevTools protocol over --remote-debugging-pipe: JSON messages separated by NUL on fds 3 (in) / 4."""

    def __init__(self, chromium, profile):
        import fcntl

        r_in, w_in = os.pipe()
        r_out, w_out = os.pipe()
        # the child's ends moved above 10 first, so putting them on 3 and 4 cannot overwrite one with the other;
        # pass_fds keeps 3 and 4 open through exec (the preexec_fn runs before the other fds are closed)
        a, b = fcntl.fcntl(r_in, fcntl.F_DUPFD, 10), fcntl.fcntl(w_out, fcntl.F_DUPFD, 10)
        self.proc = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--remote-debugging-pipe",
                "--window-size=1000,900",
                "about:blank",
            ],
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=lambda: (os.dup2(a, 3), os.dup2(b, 4)),
        )
        for fd in (r_in, w_out, a, b):
            os.close(fd)
        self.w, self.r, self.buf, self.id = os.fdopen(w_in, "wb"), os.fdopen(r_out, "rb"), b"", 0

    def send(self, method, session=None, **params):
        self.id += 1
        msg = dict(id=self.id, method=method, params=params, **({"sessionId": session} if session else {}))
        self.w.write(json.dumps(msg).encode() + b"\0")
        self.w.flush()
        while True:
            while b"\0" not in self.buf:
                chunk = self.r.read1(65536)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(line)
            if reply.get("id") == self.id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def close(self):
        self.proc.kill()
        self.proc.wait()


def browser_page(dt, url):
    # a new tab on url -> (js(expr) -> its value, wait(expr, what) -> its first truthy value)
    target = dt.send("Target.createTarget", url="about:blank")["targetId"]
    s = dt.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    dt.send("Page.navigate", s, url=url)

    def js(expr):
        return dt.send("Runtime.evaluate", s, expression=expr, returnByValue=True, awaitPromise=True)["result"].get(
            "value"
        )

    def wait(expr, what, timeout=60):
        t0 = time.time()
        while time.time() - t0 < timeout:
            v = js(expr)
            if v:
                return v
            time.sleep(0.1)
        status = js("document.getElementById('status') && document.getElementById('status').textContent")
        raise AssertionError(f"timed out waiting for {what}; the page says: {status}")

    return s, js, wait


def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "headless Chromium is needed: apt-get install chromium (.ci/run installs it)"
    return path


def test_serve_in_a_browser(server, tmp_path):
    url, _, _ = server
    dt = DevTools(chromium(), tmp_path / "profile")
    try:
        s, js, wait = browser_page(dt, url + "/")

        pixels = (
            "(() => {const i = document.getElementById('img'); if (!i.complete || !i.naturalWidth) return null;"
            " const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;"
            " const x = c.getContext('2d'); x.drawImage(i, 0, 0);"
            " return Array.from(x.getImageData(0, 0, c.width, c.height).data).join(',');})()"
        )
        first_src = wait("document.getElementById('img').src", "the first image")
        first = wait(pixels, "the first image's pixels")
        assert "tiny_photo" in js("document.body.innerText") and "step 2" in js("document.body.innerText")
        wait("document.querySelectorAll('#strip img[src]').length === 7", "the sweep strip")
        # click the slider's left end: a real mouse event on the range input
        box = js("JSON.stringify(document.getElementById('s0').getBoundingClientRect())")
        r = json.loads(box)
        x, y = r["left"] + 3, r["top"] + r["height"] / 2
        for kind in ("mousePressed", "mouseReleased"):
            dt.send("Input.dispatchMouseEvent", s, type=kind, x=x, y=y, button="left", clickCount=1)
        wait(f"document.getElementById('img').src !== {json.dumps(first_src)}", "a new image after the click")
        second = wait(pixels, "the new image's pixels")
        assert js("document.getElementById('s0').value") in ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10")
        assert second != first  # the image moved with w
        shot = os.environ.get("SERVE_SCREENSHOT")  # the README's picture: SERVE_SCREENSHOT=docs/serve.png pytest ...
        if shot:
            png = dt.send("Page.captureScreenshot", s, format="png")["data"]
            with open(shot, "wb") as fh:
                fh.write(base64.b64decode(png))
    finally:
        dt.close()


def test_serve_an_editing_run(tmp_path):
    # the editing backbone: the page asks for a source; an uploaded image is the Kontext reference, a broken one is a
    # 400
    train.main(
        [
            "--backbone",
            "flux-kontext",
            "--tiny",
            *TINY[3:],
            "--steps",
            "1",
            "--out",
            str(tmp_path / "run"),
            "--cache",
            str(tmp_path / "cache"),
        ]
    )
    args = sample.cli().parse_args(["--run", str(tmp_path / "run"), "--serve", "--port", "0"])
    pipe, backbone, spec, objectives, _ = sample.prepare(args)
    slider = sample.Slider(pipe, args, sample.run_info(pipe, backbone, spec, objectives, args))
    assert slider.info["editing"] and slider.info["objectives"] == ["tiny_preserve", "tiny_adhere"]
    srv = sample.make_server(slider, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        buf = io.BytesIO()
        sample.to_pil(torch.rand(3, 40, 24)).save(buf, format="PNG")  # another size: resized to the run's
        source = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        status, out, _ = post(url, dict(prompt="make it blue", seed=0, pref=[0.5, 0.5]))
        assert status == 400 and "upload a source image" in json.loads(out)["error"]
        status, png, headers = post(url, dict(prompt="make it blue", seed=0, pref=[0.5, 0.5], source=source))
        assert status == 200 and png[:4] == b"\x89PNG" and headers["X-Cache"] == "miss"
        from PIL import Image

        assert Image.open(io.BytesIO(png)).size == (32, 32)
        broken = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
        status, out, _ = post(url, dict(prompt="make it blue", seed=0, pref=[0.5, 0.5], source=broken))
        assert status == 400 and "not an image" in json.loads(out)["error"]
        assert "Error" not in json.loads(out)["error"] and "0x" not in json.loads(out)["error"]  # words, no internals
        assert post(url, dict(prompt="make it red", seed=0, pref=[0.5, 0.5], source=source))[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


def raw(port, request, timeout=10):
    # bytes over a plain socket (lying headers that urllib would not send) -> the status code, or None if closed
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
    return int(data.split()[1]) if data.startswith(b"HTTP/") else None


def test_the_page_trusts_no_request(server):
    # a foreign Host (DNS rebinding) or Origin (another site) is 403, a body that is not JSON 415, a lying
    # Content-Length 400 or the connection closed after the timeout, an internal failure a sentence; the page goes on
    url, slider, _ = server
    srv = sample.make_server(slider, "127.0.0.1", 0, timeout=1.0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    body = json.dumps(dict(prompt="a red circle", seed=0, pref=[0.5, 0.5])).encode()

    def post_(host, origin=None, ctype="application/json", data=body, length=None):
        head = f"POST /render HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n"
        head += f"Origin: {origin}\r\n" if origin else ""
        head += f"Content-Length: {len(data) if length is None else length}\r\nConnection: close\r\n\r\n"
        return raw(port, head.encode() + data)

    try:
        here = f"127.0.0.1:{port}"
        assert post_(here) == 200 and post_(f"localhost:{port}", f"http://localhost:{port}") == 200
        assert post_(f"evil.example:{port}") == 403  # a rebinding page sends its own name
        assert post_(here, origin="http://evil.example") == 403  # a cross-site POST
        assert post_(here, origin="null") == 403
        assert post_(f"127.0.0.1:{port + 1}") == 403
        assert raw(port, f"GET / HTTP/1.1\r\nHost: evil.example:{port}\r\nConnection: close\r\n\r\n".encode()) == 403
        assert post_(here, ctype="text/plain") == 415  # what a plain HTML form could send
        assert post_(here, length=-1) == 400
        t0 = time.time()
        assert post_(here, length=len(body) + 50) in (408, None)  # the body never arrives: no thread held forever
        assert time.time() - t0 < 8
        generate = slider.pipe.generate
        slider.pipe.generate = lambda *a, **k: 1 / 0
        try:
            status, out, _ = post(f"http://{here}", dict(prompt="a blue ring", seed=5, pref=[0.5, 0.5]))
        finally:
            slider.pipe.generate = generate
        err = json.loads(out)["error"]
        assert status == 500 and "ZeroDivision" not in err and "the server's log" in err
        assert post(f"http://{here}", dict(prompt="a red circle", seed=0, pref=[0.5, 0.5]))[0] == 200  # still up
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_tampered_adapter_cannot_script_the_page(server, tmp_path):
    # objective names come from the adapter file's metadata: one that tries to close the <script> and one that tries
    # markup are shown as text in a real browser, and run nothing
    from safetensors.torch import save_file

    import model

    _, _, run = server
    shutil.copytree(run, tmp_path / "run")
    path = tmp_path / "run" / "adapters.safetensors"
    sd, meta = model.read_safetensors(str(path))
    evil = ["</script><script>window.pwned = 1</script>", "<img src=x onerror='window.pwned = 2'>"]
    save_file(sd, str(path), metadata=dict(meta, objectives=json.dumps(evil)))
    args = sample.cli().parse_args(["--run", str(tmp_path / "run"), "--serve", "--port", "0"])
    pipe, backbone, spec, objectives, _ = sample.prepare(args)
    slider = sample.Slider(pipe, args, sample.run_info(pipe, backbone, spec, objectives, args))
    srv = sample.make_server(slider, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/"
    with urllib.request.urlopen(url, timeout=10) as r:
        page = r.read().decode()
    assert page.count("</script>") == 1 and "<img src=x" not in page  # escaped inside the JSON
    dt = DevTools(chromium(), tmp_path / "profile")
    try:
        _, js, wait = browser_page(dt, url)
        wait("document.getElementById('img').src", "the first image")  # the page works
        text = js("document.body.innerText")
        assert evil[0] in text and evil[1] in text  # the names, as text
        assert js("window.pwned === undefined") and js("document.querySelectorAll('img[src=\"x\"]').length") == 0
    finally:
        dt.close()
        srv.shutdown()
        srv.server_close()


def test_serving_beyond_this_machine_warns(server, capsys, monkeypatch):
    _, _, run = server

    class Stop:
        server_address = ("0.0.0.0", 1)

        def serve_forever(self):
            raise KeyboardInterrupt

        def server_close(self):
            pass

    monkeypatch.setattr(sample, "make_server", lambda *a, **k: Stop())
    sample.main(["--run", str(run), "--serve", "--host", "0.0.0.0", "--port", "0"])
    assert "has no authentication" in capsys.readouterr().err
    sample.main(["--run", str(run), "--serve", "--port", "0"])
    assert "no authentication" not in capsys.readouterr().err
