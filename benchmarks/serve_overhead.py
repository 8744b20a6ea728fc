"""What `sample.py --serve` adds to the model's own sampling time, per request, on a finished run.

    python benchmarks/serve_overhead.py --run runs/tiny [--rounds 20]

Alternates, round by round: (a) the model's own work for one image in this process (prompt encoding + sampling,
pipe.conditions + pipe.generate, as the server calls them) and (b) the same image through the server over HTTP on
127.0.0.1 with the cache emptied first (request parsing, the lock, PNG encoding, the response). A third row times a
cache hit. Prints medians; the overhead is (b) - (a). Timings on a shared machine are noisy: compare within a run.
"""

import argparse
import json
import os
import statistics
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished train.py run folder (the tiny default: runs/tiny)")
    p.add_argument("--rounds", type=int, default=20)
    a = p.parse_args()
    args = sample.cli().parse_args(["--run", a.run, "--serve", "--port", "0"])
    pipe, backbone, spec, objectives, _ = sample.prepare(args)
    slider = sample.Slider(pipe, args, sample.run_info(pipe, backbone, spec, objectives, args))
    if slider.info["editing"]:
        sys.exit("this script times text-to-image runs (an editing run needs a source upload per request)")
    srv = sample.make_server(slider, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/render"
    M = slider.info["pref_dim"]

    def w_of(i):
        return [1 - (i % 11) / 10, (i % 11) / 10] if M == 2 else ([1 / M] * M if M else None)

    def direct(i):
        t0 = time.perf_counter()
        cond, uncond = pipe.conditions(["a red circle"], args.guidance, args.negative_prompt)
        pipe.generate(
            cond, uncond, w_of(i), args.steps, i, args.size, args.size, args.guidance, args.solver, args.shift
        )
        return time.perf_counter() - t0

    def http(i, clear=True):
        if clear:
            slider.cache.clear()
        body = json.dumps(dict(prompt="a red circle", seed=i, pref=w_of(i))).encode()
        t0 = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=120) as r:
            r.read()
        return time.perf_counter() - t0

    direct(0), http(0)  # warm-up
    d, h, hit = [], [], []
    for i in range(1, a.rounds + 1):  # alternating, so drift hits both columns alike
        if i % 2:
            d.append(direct(i)), h.append(http(i))
        else:
            h.append(http(i)), d.append(direct(i))
        hit.append(http(i, clear=False))
    md, mh, mhit = (1000 * statistics.median(x) for x in (d, h, hit))
    print(f"run {a.run} ({backbone}, {args.size} px, {args.steps} steps), {a.rounds} rounds, medians:")
    print("| what | ms |\n|---|---|")
    print(f"| model only (encode + sample), in process | {md:.1f} |")
    print(f"| through the server, cache empty | {mh:.1f} |")
    print(f"| through the server, cache hit | {mhit:.1f} |")
    print(f"| server overhead per request (row 2 - row 1) | {mh - md:.1f} |")
    srv.shutdown()


if __name__ == "__main__":
    main()
